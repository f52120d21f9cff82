"""Process-group setup: the one place where torchrun and Slurm variables become rank, world and master.

Backend nccl on CUDA, gloo on CPU, always with a timeout so that a dead peer fails the run instead
of hanging it. CPU ranks split the node's cores between them and pin their threads (runtime/threads.py).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from distinfer.runtime.threads import pin_threads, rank_cores


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'gpu[03-05,9],login1' -> 'gpu03'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot parse Slurm node list {nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def dist_env_from(environ: Mapping[str, str]) -> DistEnv:
    """torchrun's variables when present, else Slurm's (one task per rank), else a single process."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            local_world_size=int(environ.get("LOCAL_WORLD_SIZE", 1)),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        nodes = int(environ.get("SLURM_NNODES", 1))
        return DistEnv(
            rank=int(environ["SLURM_PROCID"]),
            world_size=int(environ["SLURM_NTASKS"]),
            local_rank=int(environ.get("SLURM_LOCALID", 0)),
            local_world_size=max(1, int(environ["SLURM_NTASKS"]) // max(1, nodes)),
            master_addr=environ.get("MASTER_ADDR") or first_host(environ.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            master_port=int(environ.get("MASTER_PORT", 29500)),
        )
    return DistEnv()


def init_distributed(env: DistEnv, timeout_s: float, ranks_compute_together: bool = True) -> torch.device:
    """Join the process group (if more than one rank) and return this rank's device."""
    if torch.cuda.is_available():  # GPU cluster path: one device per local rank, NCCL
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        pin_threads(rank_cores(env.local_rank, env.local_world_size, ranks_compute_together))
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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago, for a rendezvous of ranks started on this machine."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
