"""Where this process sits in the job: the one place where torchrun and Slurm variables become rank, world
and master. Imports no torch, so that a rank's entry point can read it before torch loads
(runtime/__main__.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass


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
