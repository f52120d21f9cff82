"""Where a result came from: commit, package versions, hosts and an allow-listed environment."""

from __future__ import annotations

import functools
import importlib.metadata
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path

PACKAGES = ("distinfer", "torch", "transformers", "tokenizers", "safetensors", "deepspeed", "accelerate")
# Only these variables reach a bundle: secrets (tokens, passwords, keys) never do.
ENV_ALLOWED = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "LOCAL_SIZE", "DS_ACCELERATOR",
               "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY",
               "OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY")
ENV_ALLOWED_PREFIXES = ("SLURM_JOB_", "SLURM_NNODES", "SLURM_NTASKS", "SLURM_NODELIST", "SLURM_CPUS", "NCCL_")
ENV_DENIED_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL")


def allowed_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment variables that matter for performance, never ones that look like secrets."""
    return {
        k: v
        for k, v in sorted(environ.items())
        if (k in ENV_ALLOWED or k.startswith(ENV_ALLOWED_PREFIXES)) and not any(w in k.upper() for w in ENV_DENIED_WORDS)
    }


@functools.cache
def package_versions() -> dict[str, str | None]:
    """Versions of the packages that shape results; read once per process (a plan writes thousands of runs)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@functools.cache
def git_commit(path: Path | None = None) -> str | None:
    """The commit of the distinfer checkout (with '+dirty' for local changes), or None outside git; asked of
    git once per process."""
    where = path or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=where, capture_output=True, text=True, timeout=5)
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def provenance(environ: Mapping[str, str]) -> dict:
    """Commit, package versions, host and the allow-listed environment of this process."""
    return {
        "git_commit": git_commit(),
        "packages": package_versions(),
        "hostname": socket.gethostname(),
        "env": allowed_env(environ),
    }
