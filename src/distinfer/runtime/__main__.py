"""A rank's entry point: `python -m distinfer.runtime RUN_DIR` (started by torchrun, or srun).

SIGTERM and SIGINT are blocked here, before torch is imported and starts threads, so that every thread
inherits the mask and the worker's signal thread is the one that receives them.

GOMP_SPINCOUNT is set here too, before torch loads OpenMP: after a parallel region, OpenMP's threads
spin (300000 rounds by default, milliseconds) before they sleep. A pipeline stage that has finished
its step and waits for the next would keep a core busy that the stage now computing needs; on the
2-core bench, PP = 2 went from 26 to 42-44 tok/s at batch 1 with 20000 rounds, and PP = 1 kept its speed
(OMP_WAIT_POLICY=PASSIVE, no spinning at all, cost PP = 1 a fifth of its speed). With threads pinned
(runtime/threads.py) a spinning worker holds the very core the next stage's main thread is pinned to,
so the count is 2000 (~50 us here): PP = 1 measured no slower than with 20000. A value set by the user wins.

Ranks of a multi-rank run then execute themselves again without address-space randomization, so that all
of them lay out code and data alike (runtime/aslr.py).
"""

import os
import signal

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
os.environ.setdefault("GOMP_SPINCOUNT", "2000")

from distinfer.runtime.aslr import reexec_without_aslr  # noqa: E402

reexec_without_aslr()

from distinfer.runtime.worker import main  # noqa: E402

main()
