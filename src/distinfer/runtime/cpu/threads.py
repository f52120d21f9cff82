"""Where a CPU rank's threads run: which cores the rank uses, and one compute thread pinned to each.

Ranks that compute at the same time (tensor parallel, pipeline micro-batches) split the node's cores.
Pipeline stages without micro-batches take turns, so each may use every core; each rank then starts its
core list at a different core (by global rank), so that the main threads of two stages sit on different
cores. At a handoff the sending stage's last Python work and the receiving stage's first run side by side instead
of queueing on one core.

Pinning: the main thread goes to the rank's first core and OpenMP's workers to the others. The workers
are created by the first parallel region and inherit the main thread's mask at that moment, so
`pin_threads` must run before anything parallel (what pinning and the rotated layout gained:
docs/performance.md). A user who
sets OpenMP's own binding (OMP_PROC_BIND, OMP_PLACES, GOMP_CPU_AFFINITY, KMP_AFFINITY) keeps it: nothing
is pinned then.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from distinfer.runtime.extensions import exclusive_lock, lock_dir

OPENMP_BINDING_VARS = ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY")
_PARALLEL_GRAIN = 32768  # at::internal::GRAIN_SIZE: elements per thread below which PyTorch stays serial


def available_cores() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def rank_cores(rank: int, local_rank: int, local_world_size: int, together: bool,
               cores: list[int] | None = None) -> list[int]:
    """The cores of one rank, the main thread's first: an even share when the node's ranks compute together,
    else all of them, rotated so that every rank's main thread has a core of its own.

    The rotation goes by the global rank, not the local one: ranks that Slurm places on different nodes of one
    machine (the test cluster's two slurmd on localhost) are all local rank 0, and rotated by that their main
    threads shared one core, unlike the same stages in a local run. On separate machines the rotation changes
    nothing that matters; the ranks of one node have consecutive global ranks, so they still differ."""
    cores = sorted(cores) if cores is not None else available_cores()
    if not together:
        shift = rank % len(cores)
        return cores[shift:] + cores[:shift]
    per = max(1, len(cores) // max(1, local_world_size))
    start = (local_rank * per) % len(cores)
    return cores[start : start + per]


def pin_threads(cores: list[int]) -> bool:
    """Use `len(cores)` threads: the calling (main) thread on cores[0], OpenMP's workers on the rest.
    Returns False, and only sets the thread count, where the user set OpenMP's binding or the OS has no
    affinity calls."""
    torch.set_num_threads(len(cores))
    if not hasattr(os, "sched_setaffinity") or any(os.environ.get(name) for name in OPENMP_BINDING_VARS):
        return False
    if len(cores) > 1:
        os.sched_setaffinity(0, cores[1:])  # the workers, created now, inherit this mask
        torch.ones(len(cores) * 2 * _PARALLEL_GRAIN).add_(1)
    os.sched_setaffinity(0, cores[:1])
    return True


@contextmanager
def machine_turn(name: str) -> Iterator[None]:
    """Hold this machine's turn for `name`: the ranks on one machine pass through one at a time (an flock,
    which the kernel releases if the holder dies). For measurements that another rank's work would disturb:
    two stages that timed their kernels at the same moment each saw half the memory bandwidth, and one of
    them chose a kernel that was slower alone."""
    with exclusive_lock(lock_dir() / f"{name}.lock"):
        yield
