"""A rank's entry point: `python -m distinfer.runtime RUN_DIR` (started by torchrun, or srun).

SIGTERM and SIGINT are blocked here, before torch is imported and starts threads, so that every thread
inherits the mask and the worker's signal thread is the one that receives them.

On a machine without NVIDIA devices (or with none visible) the rank computes on CPU, and OpenMP's spin
count for ranks that share a node is set here, before torch loads OpenMP (runtime/cpu/openmp.py). A rank
that may get a GPU imports nothing of the CPU package.
"""

import glob
import os
import signal

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})

if os.environ.get("CUDA_VISIBLE_DEVICES") == "" or not glob.glob("/dev/nvidia[0-9]*"):
    from distinfer.runtime.cpu.openmp import set_rank_spin_count

    set_rank_spin_count()

from distinfer.quiet import route_third_party_logs  # noqa: E402

route_third_party_logs()  # DeepSpeed's and torchao's lines go to the rank's log

from distinfer.runtime.worker import main  # noqa: E402

main()
