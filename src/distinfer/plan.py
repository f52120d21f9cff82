"""Expand an experiment into its run matrix: one RunSpec per combination of the sweep fields."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from distinfer.spec import Experiment, as_list, layer_lists, resolve_path

DTYPE_TAGS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


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
    generation: dict
    pp: int
    layers: list[int] | None  # explicit per-stage layer counts, or None for balanced
    microbatches: int
    batch_size: int
    warmup: int
    repeats: int
    timeout_s: float
    tp: int = 1  # tensor-parallel ranks (deepspeed engine)

    @property
    def world_size(self) -> int:
        return self.pp * self.tp

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunSpec:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def config_hash(self) -> str:
        """Hash of what determines the results (not the run id or paths of the bundle)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def run_id_for(engine: str, pp: int, layers: list[int] | None, microbatches: int, batch: int, dtype: str,
               tp: int = 1) -> str:
    """Readable, unique within an experiment: e.g. pipeline-pp2-L3.5-b4-mb2-fp32, reference-b4-fp32."""
    if engine == "reference":
        return f"reference-b{batch}-{DTYPE_TAGS[dtype]}"
    if engine == "deepspeed":
        return f"deepspeed-tp{tp}-b{batch}-{DTYPE_TAGS[dtype]}"
    tag = f"-L{'.'.join(map(str, layers))}" if layers else ""
    return f"{engine}-pp{pp}{tag}-b{batch}-mb{microbatches}-{DTYPE_TAGS[dtype]}"


def expand(exp: Experiment, spec_file: Path) -> list[RunSpec]:
    """The cartesian product of the sweep fields; reference runs ignore the layout axes."""
    par = exp.parallel
    if par.layers == "auto":
        layouts: list[tuple[int, list[int] | None]] = [(pp, None) for pp in as_list(par.pp)]
    else:
        layouts = [(len(counts), list(counts)) for counts in layer_lists(par)]
    model_path = str(resolve_path(exp.model.path, spec_file)) if exp.model.path else ""
    runs: dict[str, RunSpec] = {}
    for engine, (pp, layers), mb, tp, batch in itertools.product(
        as_list(par.engine), layouts, as_list(par.microbatches), as_list(par.tp), as_list(exp.batch_size)
    ):
        if engine != "pipeline":  # the layout axes belong to the pipeline engine
            pp, layers, mb = 1, None, 1
        if engine != "deepspeed":
            tp = 1
        run_id = run_id_for(engine, pp, layers, mb, batch, exp.model.dtype, tp)
        runs.setdefault(
            run_id,
            RunSpec(
                experiment=exp.name,
                run_id=run_id,
                engine=engine,
                model_path=model_path,
                builtin=exp.model.builtin,
                dtype=exp.model.dtype,
                trust_remote_code=exp.model.trust_remote_code,
                prompts=str(resolve_path(exp.prompts, spec_file)),
                generation=exp.generation.model_dump(),
                pp=pp,
                layers=layers,
                microbatches=mb,
                batch_size=batch,
                warmup=exp.benchmark.warmup,
                repeats=exp.benchmark.repeats,
                timeout_s=par.timeout_s,
                tp=tp,
            ),
        )
    return list(runs.values())


def deepspeed_config(run: RunSpec) -> dict:
    """ds_config.json of a deepspeed run: the single source of its tensor-parallel settings.

    Kernel injection stays off: it does not run on CPU, and AutoTP needs no model-specific kernels.
    """
    return {"tensor_parallel": {"tp_size": run.tp}, "dtype": run.dtype, "replace_with_kernel_inject": False}
