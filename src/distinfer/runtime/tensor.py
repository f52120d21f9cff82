"""Tensor parallelism with DeepSpeed AutoTP, configured from the run's ds_config.json.

Every rank loads the full model on the CPU and `init_inference` keeps its shard of each linear layer;
generation then runs `transformers` generate on the sharded model on all ranks in step.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path

import torch

from distinfer.models.loading import load_full_model
from distinfer.models.tiny import cache_dir
from distinfer.runtime.pipeline import StopRule
from distinfer.runtime.ranks import DistEnv
from distinfer.runtime.reference import ReferenceEngine
from distinfer.runtime.sampling import SamplingParams

log = logging.getLogger("distinfer.tensor")


def prepare_deepspeed_env(env: DistEnv, device: torch.device) -> None:
    """What DeepSpeed needs before import: its accelerator on CPU, LOCAL_SIZE (AutoTP's all-reduce
    crashes without it under torchrun), and a kept cache for the ops it compiles at first use."""
    os.environ.setdefault("LOCAL_SIZE", str(env.local_world_size))
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))


def extensions_dir() -> Path:
    """Where distinfer keeps the ops DeepSpeed compiles (unless the user set TORCH_EXTENSIONS_DIR)."""
    return cache_dir() / "torch_extensions"


def build_deepspeed_engine(
    model_dir: Path,
    ds_config_file: Path,
    env: DistEnv,
    device: torch.device,
    sampling: SamplingParams,
    stop: StopRule,
    trust_remote_code: bool = False,
) -> ReferenceEngine:
    prepare_deepspeed_env(env, device)
    import deepspeed

    if device.type == "cpu" and env.local_world_size < env.world_size:
        # DeepSpeed's CPU shared-memory all-reduce assumes all ranks on one node and crashes (SIGSEGV)
        # across nodes; without it DeepSpeed falls back to the process group's all_reduce (gloo).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if device.type == "cpu":
        build_shm_op_once()
    config = json.loads(ds_config_file.read_text())
    model = load_full_model(model_dir, config["dtype"], torch.device("cpu"), trust_remote_code)
    engine = deepspeed.init_inference(model, config=config)
    if device.type == "cpu":
        torch.distributed.barrier()  # every rank has mapped every rank's all-reduce segment by now
        unlink_shm_segment(env)
    return ReferenceEngine(engine.module.to(device), device, sampling, stop)


def build_shm_op_once() -> None:
    """Build (or load) DeepSpeed's CPU all-reduce op before `init_inference` asks for it, one rank at a time.

    PyTorch guards each op's build directory with a `lock` file that a killed build leaves behind; every
    later build or load of that op then waits for it forever (a run hangs until its timeout). The ranks of
    this node take turns here under an flock, which the kernel releases when its holder dies: whoever holds
    it knows that no build is running in distinfer's extension directory, so any `lock` file there is stale
    and goes. A directory the user chose (TORCH_EXTENSIONS_DIR) may be shared with other programs and is
    left alone. DeepSpeed keeps the loaded op per process, so `init_inference` reuses it."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    root = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "distinfer-build.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if root == extensions_dir():
            for path in remove_stale_build_locks(root):
                log.warning("removed %s, left by an op build that was killed", path)
        builder.load(verbose=False)


def remove_stale_build_locks(root: Path) -> list[Path]:
    """Remove the `lock` files that killed op builds left in `root`'s build directories; returns them.
    Only safe while no build can be running there (see `build_shm_op_once`)."""
    stale = sorted(root.glob("*/lock"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


SHM_DIR = Path("/dev/shm")


def unlink_shm_segment(env: DistEnv) -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce segment; the mappings stay valid.

    DeepSpeed's shared-memory all-reduce (`deepspeed_shm_comm`) creates one POSIX shared-memory segment per
    rank (66 MB) and never removes it: on the development machine a few hundred tensor-parallel runs had left
    20 GB of RAM in /dev/shm. Called once every rank has opened the others' segments (after `init_inference`
    and a barrier)."""
    for path in SHM_DIR.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{env.master_port}_{env.rank}"):
        path.unlink(missing_ok=True)
