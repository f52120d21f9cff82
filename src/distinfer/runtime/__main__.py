"""A rank's entry point: `python -m distinfer.runtime RUN_DIR` (started by torchrun, or srun).

SIGTERM and SIGINT are blocked here, before torch is imported and starts threads, so that every thread
inherits the mask and the worker's signal thread is the one that receives them.
"""

import signal

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})

from distinfer.runtime.worker import main  # noqa: E402

main()
