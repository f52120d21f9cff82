"""Tensor parallelism with DeepSpeed AutoTP, configured from the run's ds_config.json.

Every rank loads the full model on the CPU and `init_inference` keeps its shard of each linear layer;
generation then runs `transformers` generate on the sharded model on all ranks in step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from distinfer.models.loading import load_full_model
from distinfer.runtime.extensions import build_turn, extensions_dir
from distinfer.runtime.pipeline import StopRule
from distinfer.runtime.ranks import DistEnv
from distinfer.runtime.reference import ReferenceEngine
from distinfer.runtime.sampling import Sampler


def prepare_deepspeed_env(env: DistEnv, device: torch.device) -> None:
    """What DeepSpeed needs before import: its accelerator on CPU, LOCAL_SIZE (AutoTP's all-reduce
    crashes without it under torchrun), and a kept cache for the ops it compiles at first use."""
    os.environ.setdefault("LOCAL_SIZE", str(env.local_world_size))
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))


def build_deepspeed_engine(
    model_dir: Path,
    ds_config_file: Path,
    env: DistEnv,
    device: torch.device,
    sampler: Sampler,
    stop: StopRule,
    trust_remote_code: bool = False,
) -> ReferenceEngine:
    model = deepspeed_model(model_dir, json.loads(ds_config_file.read_text()), env, device, trust_remote_code)
    return ReferenceEngine(model, device, sampler, stop)


def deepspeed_model(model_dir: Path, config: dict, env: DistEnv, device: torch.device,
                    trust_remote_code: bool = False) -> torch.nn.Module:
    """This rank's shard of the model under DeepSpeed AutoTP (`config`: the run's ds_config), on `device`; every
    rank of the process group calls it."""
    prepare_deepspeed_env(env, device)
    import deepspeed

    if device.type == "cpu" and env.local_world_size < env.world_size:
        # DeepSpeed's CPU shared-memory all-reduce assumes all ranks on one node and crashes (SIGSEGV)
        # across nodes; without it DeepSpeed falls back to the process group's all_reduce (gloo).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if device.type == "cpu":
        build_shm_op_once()
    model = load_full_model(model_dir, config["dtype"], torch.device("cpu"), trust_remote_code)
    engine = deepspeed.init_inference(model, config=config)
    if device.type == "cpu":
        torch.distributed.barrier()  # every rank has mapped every rank's all-reduce segment by now
        unlink_shm_segment(env)
    return engine.module.to(device)


def build_shm_op_once() -> None:
    """Build (or load) DeepSpeed's CPU all-reduce op before `init_inference` asks for it, one rank at a time
    (`extensions.build_turn`: a killed build's `lock` file would make every later load wait forever). DeepSpeed
    keeps the loaded op per process, so `init_inference` reuses it."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    with build_turn():
        builder.load(verbose=False)


SHM_DIR = Path("/dev/shm")


def unlink_shm_segment(env: DistEnv) -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce segment; the mappings stay valid.

    DeepSpeed's shared-memory all-reduce (`deepspeed_shm_comm`) creates one POSIX shared-memory segment per
    rank (66 MB) and never removes it: a few hundred tensor-parallel runs on one machine left
    20 GB of RAM in /dev/shm. Called once every rank has opened the others' segments (after `init_inference`
    and a barrier)."""
    for path in SHM_DIR.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{env.master_port}_{env.rank}"):
        path.unlink(missing_ok=True)
