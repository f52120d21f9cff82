"""`python -m distinfer.serving RUN_DIR`: a serving run's load generator (serving/runner.py)."""

from distinfer.serving.runner import main

main()
