"""Expand an experiment into its run matrix: one RunSpec per combination of the sweep fields."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from distinfer.engines import capabilities
from distinfer.layout import world_size
from distinfer.profiles import HARDWARE
from distinfer.scenario import EndpointSpec, LoadSettings, RunLoad
from distinfer.spec_schema import Experiment, GenerationSpec, VllmSpec, as_list, layer_lists, resolve_path

NAME_FIELDS = ("experiment", "run_id")  # what names a run without changing its results
# A run's typed sections and their classes (pydantic models, validated from run.json's dicts).
SECTIONS = {"generation": GenerationSpec, "scenario": RunLoad, "endpoint": EndpointSpec, "vllm": VllmSpec}
PRECISION_TAGS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int8": "int8"}


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs; serialised as run.json and read back by every rank."""

    experiment: str
    run_id: str
    engine: str
    model_path: str  # a model folder, or "" for a built-in model not built yet
    builtin: str | None
    dtype: str
    trust_remote_code: bool
    prompts: str
    generation: GenerationSpec  # a dict is taken too, and validated
    pp: int
    layers: list[int] | None  # explicit per-stage layer counts, or None for balanced
    microbatches: int
    batch_size: int
    warmup: int
    repeats: int
    timeout_s: float
    tp: int = 1  # tensor-parallel ranks: per pipeline stage, or DeepSpeed AutoTP's
    ep: int = 1  # expert-parallel ranks per pipeline stage (mixture-of-experts models)
    quantization: str | None = None  # "int8": torchao int8 weight-only; `dtype` is then the activations' dtype
    prompt_set: dict | None = None  # {context_tokens, count, question}: `prompts` is then a text file
    num_prompts: int | None = None  # use the first n prompts (repeating the file): weak scaling
    study: str = "matrix"
    profile: str = "none"  # none | torch | nsys
    perplexity_text: str | None = None
    perplexity_tokens: int = 512
    cpu_kernels: str = "fast"  # fast | stock: linear-layer kernels of pipeline ranks on CPU
    scenario: RunLoad | None = None  # a serving run's load (the experiment's scenario at this run's rate or users)
    endpoint: EndpointSpec | None = None  # the OpenAI-compatible server a serving run measures
    vllm: VllmSpec | None = None  # engine vllm: how `vllm serve` starts

    def __post_init__(self) -> None:
        """The typed run sections from their dicts (run.json's, or a caller's), validated; defaults live in the
        section classes only."""
        for name, section in SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, section.model_validate(value))

    @property
    def serving(self) -> bool:
        return self.scenario is not None

    @property
    def load_settings(self) -> LoadSettings:
        """How requests are sent and limited: the serving run's load, else the defaults (an offline run sent
        through a server)."""
        return self.scenario or LoadSettings()

    @property
    def max_batch(self) -> int:
        """The requests a server decodes together at most (a serving run's), else the batch size."""
        return self.scenario.max_batch if self.scenario else self.batch_size

    @property
    def precision(self) -> str:
        """What the precision sweep varies: the dtype, or the quantization when there is one."""
        return self.quantization or self.dtype

    @property
    def context_tokens(self) -> int | None:
        """The long-context prompt set's length in tokens (None for a prompt file)."""
        return (self.prompt_set or {}).get("context_tokens")

    @property
    def world_size(self) -> int:
        return world_size(self.pp, self.tp, self.ep)

    def summary_fields(self) -> dict:
        """What summary.json says of the run itself, whichever process measured it (ranks or a load generator)."""
        return {"run_id": self.run_id, "experiment": self.experiment, "engine": self.engine,
                "world_size": self.world_size, "pp": self.pp, "tp": self.tp, "microbatches": self.microbatches,
                "batch_size": self.batch_size, "dtype": self.dtype, "quantization": self.quantization,
                "precision": self.precision, "context_tokens": self.context_tokens, "num_prompts": self.num_prompts}

    def to_dict(self) -> dict:
        """The fields as a dict, the sections as JSON values (plain values shared, not copied: a plan serialises
        thousands)."""
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        for name in SECTIONS:
            if out[name] is not None:
                out[name] = out[name].model_dump(mode="json")
        return out

    @classmethod
    def from_dict(cls, data: dict) -> RunSpec:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    @functools.cached_property
    def _hash(self) -> str:
        fields = {k: v for k, v in self.to_dict().items() if k not in NAME_FIELDS}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def config_hash(self) -> str:
        """Hash of what determines the results: every field but the run's names (`experiment`, `run_id`).
        The model and prompt paths count: another path may hold another model."""
        return self._hash


def run_id_for(engine: str, pp: int, layers: list[int] | None, microbatches: int, batch: int, precision: str,
               tp: int = 1, context: int | None = None, num_prompts: int | None = None, ep: int = 1) -> str:
    """Readable, unique within an experiment: e.g. pipeline-pp2-L3.5-b4-mb2-fp32, pipeline-pp2-tp2-b4-mb1-fp16,
    reference-b4-int8-ctx2048."""
    suffix = PRECISION_TAGS[precision] + (f"-ctx{context}" if context else "") + (f"-n{num_prompts}" if num_prompts else "")
    caps = capabilities(engine)
    groups = f"-mb{microbatches}" if caps.microbatches else ""
    return f"{engine}{caps.layout_tag(pp, layers, tp, ep)}-b{batch}{groups}-{suffix}"


def expand(exp: Experiment, spec_file: Path) -> list[RunSpec]:
    """The cartesian product of the sweep fields; reference runs ignore the layout axes. With
    `reference: auto`, a reference run is added for every batch size, precision and context of the others.
    A serving scenario against an endpoint gives one run per rate or user count."""
    if exp.endpoint is not None:
        return expand_endpoint(exp, spec_file)
    runs = _expand_offline(exp, spec_file)
    return expand_serving(exp, runs, spec_file) if exp.scenario.kind == "serving" else runs


def _expand_offline(exp: Experiment, spec_file: Path) -> list[RunSpec]:
    par = exp.parallel
    if par.layers == "auto":
        layouts: list[tuple[int, list[int] | None]] = [(pp, None) for pp in as_list(par.pp)]
    else:
        layouts = [(len(counts), list(counts)) for counts in layer_lists(par)]
    gpu = HARDWARE[exp.cluster.profile].gpu
    prompt_set = None if isinstance(exp.prompts, str) else exp.prompts
    prompts_file = exp.prompts if prompt_set is None else prompt_set.texts
    contexts = [None] if prompt_set is None else as_list(prompt_set.context_tokens)
    common = dict(
        experiment=exp.name,
        model_path=str(resolve_path(exp.model.path, spec_file)) if exp.model.path else "",
        builtin=exp.model.builtin,
        trust_remote_code=exp.model.trust_remote_code,
        prompts=str(resolve_path(prompts_file, spec_file)),
        warmup=exp.benchmark.warmup,
        repeats=exp.benchmark.repeats,
        timeout_s=par.timeout_s,
        cpu_kernels=par.cpu_kernels,
        study=exp.study,
        profile=exp.benchmark.profile,
        perplexity_text=(str(resolve_path(exp.accuracy.perplexity_text, spec_file))
                         if exp.accuracy.perplexity_text else None),
        perplexity_tokens=exp.accuracy.perplexity_tokens,
    )

    def make(engine: str, pp: int, layers: list[int] | None, mb: int, tp: int, batch: int, precision: str,
             context: int | None, num_prompts: int | None, ep: int = 1) -> RunSpec:
        generation = exp.generation if context is None else exp.generation.model_copy(
            update={"max_prompt_tokens": context})
        return RunSpec(
            **common,
            run_id=run_id_for(engine, pp, layers, mb, batch, precision, tp, context, num_prompts, ep),
            engine=engine,
            dtype=("float16" if gpu else "float32") if precision == "int8" else precision,
            quantization="int8" if precision == "int8" else None,
            generation=generation,
            pp=pp,
            layers=layers,
            microbatches=mb,
            batch_size=batch,
            tp=tp,
            ep=ep,
            prompt_set=None if context is None else {"context_tokens": context, "count": prompt_set.count,
                                                     "question": prompt_set.question},
            num_prompts=num_prompts,
            vllm=exp.vllm if capabilities(engine).program == "vllm" else None,
        )

    runs: dict[str, RunSpec] = {}
    for engine, (pp, layers), mb, tp, ep, batch, precision, context in itertools.product(
        as_list(par.engine), layouts, as_list(par.microbatches), as_list(par.tp), as_list(par.ep),
        as_list(exp.batch_size), as_list(exp.model.dtype), contexts,
    ):
        axes = capabilities(engine).axes(pp, layers, mb, tp, ep)  # the axes the engine does not take are 1
        if axes is None:  # e.g. DeepSpeed's AutoTP on one rank splits nothing: that run is the reference
            continue
        pp, layers, mb, tp, ep = axes
        num_prompts = exp.prompts_per_rank * pp * max(tp, ep) if exp.prompts_per_rank else None
        run = make(engine, pp, layers, mb, tp, batch, precision, context, num_prompts, ep)
        runs.setdefault(run.run_id, run)
    if exp.reference == "auto":
        wanted: dict[tuple, list[int | None]] = {}
        for run in runs.values():
            if not capabilities(run.engine).single_device:
                wanted.setdefault((run.batch_size, run.precision, run.context_tokens), []).append(run.num_prompts)
        for (batch, precision, context), counts in wanted.items():
            num_prompts = None if None in counts else max(counts)  # type: ignore[type-var]
            reference = make("reference", 1, None, 1, 1, batch, precision, context, num_prompts)
            covered = any(r.engine == reference.engine and r.batch_size == batch and r.precision == precision
                          and r.context_tokens == context
                          and (r.num_prompts is None or (num_prompts is not None and r.num_prompts >= num_prompts))
                          for r in runs.values())
            if not covered:
                runs.setdefault(reference.run_id, reference)
    return list(runs.values())


def expand_serving(exp: Experiment, offline: list[RunSpec], spec_file: Path) -> list[RunSpec]:
    """distinfer's server measured at each load, for each layout the experiment names (run ids such as
    pipeline-pp1-fp32-rate4, pipeline-pp2-mb4-fp32-rateinf, deepspeed-tp2-fp32-rate4, reference-fp32-c8;
    `microbatches` is the number of groups of requests in flight, at least one per stage); with `reference: auto` the offline reference runs stay, so
    that the served tokens are checked against them."""
    from distinfer.scenario import load_tag

    listed = set(as_list(exp.parallel.engine))
    runs = [r for r in offline if capabilities(r.engine).single_device and exp.reference == "auto"]
    for run in offline:
        if run.engine not in listed:
            continue
        groups = f"-mb{run.microbatches}" if run.microbatches > 1 else ""
        layout = (f"{run.engine}{capabilities(run.engine).layout_tag(run.pp, run.layers, run.tp, run.ep)}{groups}-"
                  f"{PRECISION_TAGS[run.precision]}")
        for kind, value in exp.scenario.loads():
            runs.append(dataclasses.replace(run, run_id=f"{layout}-{load_tag(kind, value)}", batch_size=1,
                                            warmup=0, scenario=serving_load(exp, kind, value, spec_file)))
    return list({r.run_id: r for r in runs}.values())


def serving_load(exp: Experiment, kind: str, value: float | int, spec_file: Path) -> RunLoad:
    """The scenario at one load of its sweep, its workload file's path resolved from the experiment file."""
    load = RunLoad.of(exp.scenario, kind, value)
    for name in ("sharegpt", "sessions", "trace"):
        section = getattr(load, name)
        if section is not None:
            resolved = str(resolve_path(section.file, spec_file))
            load = load.model_copy(update={name: section.model_copy(update={"file": resolved})})
    return load


def expand_endpoint(exp: Experiment, spec_file: Path) -> list[RunSpec]:
    """One run per load of the serving sweep, each measuring the experiment's endpoint (run ids such as
    endpoint-rate4, endpoint-rateinf, endpoint-c8)."""
    from distinfer.scenario import load_tag

    assert exp.endpoint is not None
    runs = []
    for kind, value in exp.scenario.loads():
        runs.append(RunSpec(
            experiment=exp.name, run_id=f"endpoint-{load_tag(kind, value)}", engine="endpoint",
            model_path=str(resolve_path(exp.model.path, spec_file)) if exp.model.path else "",
            builtin=exp.model.builtin, dtype=as_list(exp.model.dtype)[0], trust_remote_code=False,
            prompts=str(resolve_path(exp.prompts if isinstance(exp.prompts, str) else exp.prompts.texts, spec_file)),
            generation=exp.generation, pp=1, layers=None, microbatches=1, batch_size=1, warmup=0,
            repeats=1, timeout_s=exp.scenario.timeout_s, study=exp.study,
            scenario=serving_load(exp, kind, value, spec_file), endpoint=exp.endpoint))
    return runs


def deepspeed_config(run: RunSpec) -> dict:
    """ds_config.json of a deepspeed run: the single source of its tensor-parallel settings.

    Kernel injection stays off: it does not run on CPU, and AutoTP needs no model-specific kernels.
    """
    return {"tensor_parallel": {"tp_size": run.tp}, "dtype": run.dtype, "replace_with_kernel_inject": False}


def resolve_builtin_models(runs: list[RunSpec]) -> list[RunSpec]:
    """Build (or reuse from the cache) the built-in models the runs name, and point the runs at them."""
    from distinfer.models.tiny import build_tiny_model

    built: dict[str, str] = {}
    resolved = []
    for run in runs:
        if run.builtin:
            if run.builtin not in built:
                built[run.builtin] = str(build_tiny_model(run.builtin))
            run = dataclasses.replace(run, model_path=built[run.builtin])
        resolved.append(run)
    return resolved
