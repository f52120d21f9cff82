"""A rank's entry point: `python -m distinfer.runtime RUN_DIR` (started by torchrun, or srun).

SIGTERM and SIGINT are blocked here, before torch is imported and starts threads, so that every thread
inherits the mask and the worker's signal thread is the one that receives them.

OpenMP's spin count is set here too, before torch loads OpenMP (runtime/openmp.py).

Ranks of a multi-rank run then execute themselves again without address-space randomization, so that all
of them lay out code and data alike (runtime/aslr.py).
"""

import signal

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})

from distinfer.runtime.openmp import set_rank_spin_count  # noqa: E402

set_rank_spin_count()

from distinfer.runtime.aslr import reexec_without_aslr  # noqa: E402

reexec_without_aslr()

from distinfer.runtime.worker import main  # noqa: E402

main()
