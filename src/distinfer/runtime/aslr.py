"""Ranks of a multi-rank run lay out their memory alike: address-space layout randomization off.

With ASLR every process maps libpython, libtorch and its heap at different addresses. Where pipeline
stages take turns on the same cores (CPU ranks of one node), the stage that takes over runs its first
layers slower than the same layers in one process (README, "Where the two-stage step loses"); with the
same layout in both processes that loss is smaller. Why is a guess: the cores' branch predictors are
indexed by virtual address, so with equal layouts one stage's history also serves the other.
Measured with `bench/paired.py --aslr-ab` (a pair of ranks with and a pair without, taking turns round
by round) on the 2-vCPU development machine, batch 1, 8 runs of 16 rounds: two stages / one stage
0.961-1.008 (mean 0.988) without, 0.938-1.003 (mean 0.967) with; higher without in 7 of the 8 runs.
At batch 8 (two runs) 0.980 and 0.998 without, 1.001 and 1.000 with: no difference.

The flag takes effect when a program is executed: the rank's entry point sets it and executes itself
again (`reexec_without_aslr`, same PID, before torch is imported). Where the kernel or a seccomp
filter refuses (e.g. Docker's default profile), the rank goes on with ASLR. DISTINFER_ASLR=keep turns
this off.
"""

from __future__ import annotations

import ctypes
import os
import sys

from distinfer.runtime.ranks import dist_env_from

ADDR_NO_RANDOMIZE = 0x0040000  # <linux/personality.h>
_QUERY = 0xFFFFFFFF  # personality(0xffffffff) returns the current persona without changing it


def _personality(persona: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.personality.restype = ctypes.c_int
    libc.personality.argtypes = [ctypes.c_ulong]
    return int(libc.personality(persona))


def aslr_disabled() -> bool:
    """Whether programs this process executes start without address-space randomization."""
    if not sys.platform.startswith("linux"):
        return False
    current = _personality(_QUERY)
    return current != -1 and bool(current & ADDR_NO_RANDOMIZE)


def set_randomization(on: bool) -> bool:
    """Turn randomization on or off for the programs this process executes from now on; False where the
    kernel refuses."""
    if not sys.platform.startswith("linux"):
        return False
    current = _personality(_QUERY)
    if current == -1:
        return False
    _personality(current & ~ADDR_NO_RANDOMIZE if on else current | ADDR_NO_RANDOMIZE)
    return aslr_disabled() != on


def reexec_without_aslr() -> None:
    """Execute this Python program again, same arguments, without randomization: for ranks of a multi-rank
    run, before anything heavy is imported. Returns where nothing is to be done or the kernel refuses."""
    if os.environ.get("DISTINFER_ASLR") == "keep" or dist_env_from(os.environ).world_size < 2 or aslr_disabled():
        return
    if set_randomization(False):
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
