"""Process-group setup for the rank, world and master that runtime/ranks.py reads from torchrun or Slurm.

Backend nccl on CUDA, gloo on CPU, always with a timeout so that a dead peer fails the run instead
of hanging it. CPU ranks split the node's cores between them and pin their threads (runtime/cpu/threads.py).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from distinfer.runtime.ranks import DistEnv


def init_distributed(env: DistEnv, timeout_s: float, ranks_compute_together: bool = True) -> torch.device:
    """Join the process group (if more than one rank) and return this rank's device."""
    if torch.cuda.is_available():  # GPU cluster path: one device per local rank, NCCL
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        from distinfer.runtime.cpu.threads import pin_threads, rank_cores

        device = torch.device("cpu")
        pin_threads(rank_cores(env.rank, env.local_rank, env.local_world_size, ranks_compute_together))
        backend = "gloo"
    if env.world_size > 1 and not dist.is_initialized():
        # env:// reuses torchrun's agent store when there is one; under plain srun it starts its own.
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    return device


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
