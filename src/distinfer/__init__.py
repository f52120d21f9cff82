"""distinfer: a benchmarking harness for distributed LLM inference on Slurm clusters."""

__version__ = "0.1.0"
