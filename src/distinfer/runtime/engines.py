"""The engines a run can measure, behind one interface and a registry (as optimum-benchmark's backends).

An engine takes the run's batches one at a time (`generate`) on every rank of the run and returns the
tokens and their times on rank 0 (None elsewhere); it keeps raw per-step timings in `steps` and the run's
stop rule in `stop`. A builder loads this rank's share of the model and returns the engine with facts
about that share (layers, parameters, and what the engine chose). The worker only picks the builder by
the run's `engine` field.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from distinfer.layout import split_layers
from distinfer.models.loading import count_parameters, load_full_model, load_stage_model
from distinfer.models.profiles import model_layer_count
from distinfer.plan import RunSpec
from distinfer.runtime.pipeline import Batch, BatchOutput, PipelineEngine, StopRule
from distinfer.runtime.ranks import DistEnv
from distinfer.runtime.reference import ReferenceEngine
from distinfer.runtime.sampling import Sampler


class Engine(Protocol):
    steps: list[dict]
    stop: StopRule

    def generate(self, batch: Batch) -> BatchOutput | None: ...


@dataclass(frozen=True)
class EngineContext:
    """What every builder gets: the run, this rank's place and device, and what the worker prepared."""

    spec: RunSpec
    env: DistEnv
    device: torch.device
    tokenizer: object
    run_dir: Path
    stop: StopRule
    sampler: Sampler

    @property
    def model_dir(self) -> Path:
        return Path(self.spec.model_path)


Builder = Callable[[EngineContext], tuple[Engine, dict]]
ENGINES: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def add(builder: Builder) -> Builder:
        ENGINES[name] = builder
        return builder

    return add


def build_engine(ctx: EngineContext) -> tuple[Engine, dict]:
    """The engine of this rank and facts about its share of the model."""
    if ctx.spec.engine not in ENGINES:
        raise ValueError(f"unknown engine {ctx.spec.engine!r}; known: {', '.join(ENGINES)}")
    if ctx.env.world_size != ctx.spec.world_size:
        raise RuntimeError(f"run needs {ctx.spec.world_size} ranks but was started with {ctx.env.world_size}")
    return ENGINES[ctx.spec.engine](ctx)


def maybe_quantized(model: torch.nn.Module, spec: RunSpec) -> torch.nn.Module:
    if spec.quantization == "int8":
        from distinfer.models.quantize import quantize_int8_weights

        return quantize_int8_weights(model)
    return model


@register("reference")
def build_reference(ctx: EngineContext) -> tuple[Engine, dict]:
    """`transformers` generate on the whole model, one device."""
    spec = ctx.spec
    model = maybe_quantized(load_full_model(ctx.model_dir, spec.dtype, ctx.device, spec.trust_remote_code), spec)
    info = {"layers": list(range(model_layer_count(ctx.model_dir))), "parameters": count_parameters(model)}
    if spec.perplexity_text:
        from distinfer.runtime.accuracy import perplexity

        info.update(perplexity(model, ctx.tokenizer, Path(spec.perplexity_text), spec.perplexity_tokens, ctx.device))
    return ReferenceEngine(model, ctx.device, ctx.sampler, ctx.stop), info


@register("deepspeed")
def build_deepspeed(ctx: EngineContext) -> tuple[Engine, dict]:
    """DeepSpeed AutoTP over the run's ranks, configured by the bundle's ds_config.json."""
    from distinfer.runtime.tensor import build_deepspeed_engine

    engine = build_deepspeed_engine(ctx.model_dir, ctx.run_dir / "ds_config.json", ctx.env, ctx.device,
                                    ctx.sampler, ctx.stop, ctx.spec.trust_remote_code)
    return engine, {"layers": list(range(model_layer_count(ctx.model_dir))),
                    "parameters": count_parameters(engine.model)}


@register("pipeline")
def build_pipeline(ctx: EngineContext) -> tuple[Engine, dict]:
    """distinfer's pipeline: this rank's stage only, its layers sharded over the stage's ranks where the run
    has tp > 1 (runtime/tensor_parallel.py), or its experts where it has ep > 1 (runtime/expert_parallel.py);
    on CPU with one rank per stage and `cpu_kernels: fast`, the CPU package's speed-ups (runtime/cpu/)."""
    spec, env = ctx.spec, ctx.env
    stage, group, groups = env.rank, None, None
    split = max(spec.tp, spec.ep)  # ranks per stage
    if split > 1:
        from distinfer.runtime.tensor_parallel import stage_groups

        groups = stage_groups(spec.pp, split, ctx.device)
        stage, group = groups.stage, groups.pipeline
    layout = split_layers(model_layer_count(ctx.model_dir), spec.pp, spec.layers)[stage]
    model, family = load_stage_model(ctx.model_dir, layout, spec.dtype, ctx.device, spec.trust_remote_code)
    model = maybe_quantized(model, spec)
    info: dict = {"layers": list(range(layout.start, layout.stop)), "parameters": count_parameters(model)}
    if spec.tp > 1:
        from distinfer.runtime.tensor_parallel import shard_stage

        shard_stage(model, family, groups.tensor)
        info.update(stage=stage, tp_rank=groups.tp_rank, parameters=count_parameters(model))
    if spec.ep > 1:
        from distinfer.runtime.expert_parallel import shard_experts

        info["expert_stats"] = shard_experts(model, groups.tensor.get_group(), groups.tp_rank, spec.ep)
        info.update(stage=stage, ep_rank=groups.tp_rank, parameters=count_parameters(model))
    decoder = None
    if ctx.device.type == "cpu" and spec.cpu_kernels == "fast" and split == 1:
        if env.world_size > 1:
            dist.barrier()  # every stage loaded: no rank's loading disturbs another's kernel timing
        from distinfer.runtime.cpu import speed_up_stage

        facts, decoder = speed_up_stage(model)
        info.update(facts)
    info["decode_path"] = decoder.name if decoder else "transformers"
    if decoder is not None and decoder.one_call_rows:
        info["one_call_rows"] = [decoder.one_call_rows[0], decoder.one_call_rows[-1]]
    shared = os.environ.get("DISTINFER_TRANSPORT") != "gloo" and split == 1
    engine = PipelineEngine(model, family, stage, spec.pp, ctx.device, ctx.sampler, ctx.stop,
                            spec.microbatches, group=group, decoder=decoder, shared_memory=shared,
                            timeout_s=spec.timeout_s)
    info["transport"] = engine.transport
    return engine, info
