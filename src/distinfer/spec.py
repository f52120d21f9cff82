"""Experiment file: YAML validated into typed models, with messages that name file and field.

Nothing here imports torch or transformers: validation runs on a login node in milliseconds.
"""

from __future__ import annotations

import difflib
import itertools
import re
import typing
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distinfer.engines import SELECTABLE, capabilities, named, taking
from distinfer.layout import Layout, LayoutError, place_engine, tensor_split_problem, world_size
from distinfer.models.profiles import config_layer_count, max_positions, read_json_file, read_model_config
from distinfer.models.tiny import TINY_MODELS
from distinfer.profiles import HARDWARE
from distinfer.prompts import PromptFileError, load_prompts, read_paragraphs
from distinfer.scenario import EndpointSpec, ScenarioSpec


class SpecError(Exception):
    """A bad experiment file: the message names the file, the field and what is allowed."""


PositiveInt = Annotated[int, Field(ge=1)]
Dtype = Literal["float32", "float16", "bfloat16", "int8"]
Study = Literal["matrix", "strong-scaling", "weak-scaling", "batch-sweep", "precision-sweep", "optimization"]
Engine = Literal["pipeline", "reference", "deepspeed", "vllm"]
Builtin = Literal["tiny-llama", "tiny-gpt2", "tiny-moe", "tiny-llama-trained", "tiny-gpt2-trained"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


class ModelSpec(_Strict):
    """Which model to load and how."""

    path: str | None = None
    """A local Hugging Face model folder (config.json, safetensors weights, tokenizer)."""
    builtin: Builtin | None = None
    """A tiny model built offline by distinfer (cached outside git)."""
    config: str | None = None
    """A config.json with the model's architecture, for planning where `path` exists only on the cluster."""
    dtype: Dtype | list[Dtype] = "float32"
    """float32 | float16 | bfloat16 | int8, or a list (a precision sweep). int8: torchao int8 weight-only
    quantization; activations in float16 on GPUs, float32 on CPU."""
    trust_remote_code: bool = False
    """Allow model code shipped with the checkpoint. Off unless set here."""

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.path is None) == (self.builtin is None):
            raise ValueError("give exactly one of 'path' (a model folder) or 'builtin' (tiny-llama | tiny-gpt2)")
        if self.path is not None and ("\n" in self.path or not self.path.strip()):
            raise ValueError("'path' must be a non-empty path without newlines")
        return self


class GenerationSpec(_Strict):
    """Decoding settings, identical on every engine."""

    max_new_tokens: PositiveInt = 32
    sampling: Literal["greedy", "sample"] = "greedy"
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0)
    """0 disables top-k."""
    top_p: float = Field(1.0, gt=0, le=1)
    """1.0 disables top-p."""
    seed: int = Field(0, ge=0, le=2**63 - 1)
    max_prompt_tokens: PositiveInt | None = None
    """Longest prompt in tokens: longer prompts are cut from the left; the memory plan uses it too."""


class ParallelSpec(_Strict):
    """Engine and layout; list values are sweep axes."""

    engine: Engine | list[Engine] = "pipeline"
    pp: PositiveInt | list[PositiveInt] = 1
    """Pipeline stages (one rank each); pipeline engine."""
    tp: PositiveInt | list[PositiveInt] = 1
    """Tensor-parallel ranks: per pipeline stage (pipeline engine), or DeepSpeed AutoTP's (deepspeed engine)."""
    ep: PositiveInt | list[PositiveInt] = 1
    """Expert-parallel ranks per pipeline stage (pipeline engine, mixture-of-experts models)."""
    layers: Literal["auto"] | list[PositiveInt] | list[list[PositiveInt]] = "auto"
    """'auto' (balanced), one list of layers per stage, or a list of such lists (a sweep)."""
    microbatches: PositiveInt | list[PositiveInt] = 1
    timeout_s: float = Field(120.0, gt=0)
    """Collective/point-to-point timeout: a dead peer fails the run after this long."""
    cpu_kernels: Literal["fast", "stock"] = "fast"
    """Pipeline ranks on CPU: 'fast' runs fp32 linear layers with oneDNN (and one-row products split over the
    cores); 'stock' keeps PyTorch's default (MKL). GPU ranks always use cuBLAS."""


class VllmSpec(_Strict):
    """How engine vllm starts `vllm serve` (an engine in its own environment, called as a separate program)."""

    python: Annotated[str, Field(pattern=NO_NEWLINE)] | None = None
    """The Python of vLLM's environment; default: $DISTINFER_VLLM_PYTHON, else .venv-vllm/bin/python (make
    vllm-env) in the current folder, else python3 (on a cluster: inside the vLLM image)."""
    image: Annotated[str, Field(pattern=NO_NEWLINE)] | None = None
    """With container.runtime apptainer: the image vLLM's jobs run in (containers/vllm.def: vLLM with distinfer
    inside); default: container.image."""
    max_model_len: PositiveInt | None = None
    """vLLM's --max-model-len (the KV cache's longest sequence); default: the model's positions."""
    enforce_eager: bool | Literal["auto"] = "auto"
    """--enforce-eager: auto is eager except for pipeline stages on CPU (vLLM's CPU pipeline runs compiled)."""
    args: list[Annotated[str, Field(pattern=NO_NEWLINE)]] = []
    """Further `vllm serve` arguments, passed as they are (never through a shell), e.g. [--block-size, '32']."""
    env: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], Annotated[str, Field(pattern=NO_NEWLINE)]] = {}
    """Environment of the vLLM server, e.g. VLLM_CPU_KVCACHE_SPACE: '2' (GiB of KV cache on CPU)."""

    @field_validator("args")
    @classmethod
    def _not_layout(cls, value: list[str]) -> list[str]:
        owned = {"--pipeline-parallel-size", "-pp", "--tensor-parallel-size", "-tp", "--dtype", "--port", "--host",
                 "--max-num-seqs", "--served-model-name", "--max-model-len", "--enforce-eager"}
        for arg in value:
            if arg.split("=", 1)[0] in owned:
                raise ValueError(f"{arg.split('=', 1)[0]} is set by distinfer from the experiment (parallel.pp / tp, "
                                 "model.dtype, batch_size or scenario.max_batch, vllm.max_model_len, "
                                 "vllm.enforce_eager); remove it from vllm.args")
        return value


class BenchmarkSpec(_Strict):
    """Measurement settings."""

    warmup: int = Field(1, ge=0)
    """Batches run before measuring (outputs discarded)."""
    repeats: PositiveInt = 1
    """Passes over the whole prompt set; completions come from the first."""
    profile: Literal["none", "torch", "nsys"] = "none"
    """torch: a torch.profiler trace of the first measured batch per rank (trace_rank_<r>.json, opens in
    Perfetto); nsys: the job script runs the ranks under `nsys profile` (GPU clusters)."""


class PromptSetSpec(_Strict):
    """Long-context prompts built deterministically from a text file (paragraphs separated by blank lines):
    prompt i starts at paragraph i and takes the following ones (wrapping around) until it has
    `context_tokens` tokens, cut from the left, ending with `question`."""

    texts: str
    context_tokens: PositiveInt | list[PositiveInt]
    """Tokens per prompt; a list is a sweep axis (e.g. [2048, 4096])."""
    count: PositiveInt = 8
    question: Annotated[str, Field(min_length=1)] = "Question: what is the passage above about? Answer:"


class AccuracySpec(_Strict):
    """Accuracy measures beside the completions."""

    perplexity_text: str | None = None
    """A fixed text; reference runs report its perplexity (compare precisions and quantization)."""
    perplexity_tokens: PositiveInt = 512


SAFE_SBATCH = r"^[A-Za-z0-9._,:+@-]+$"  # values that go into #SBATCH lines verbatim
NO_NEWLINE = r"^[^\n\r\x00]*$"
SLURM_TIME = r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$"
SLURM_MEM = r"^\d+[KMGT]?$"
EXTRA_SBATCH = r"^--[a-z][a-z-]*(=[A-Za-z0-9._,:=/@+-]+)?$"


PATTERN_HELP = {
    SAFE_SBATCH: "letters, digits and . _ , : + @ - only (the value goes into an #SBATCH line as it is)",
    NO_NEWLINE: "must not contain newlines or NUL characters",
    SLURM_TIME: "a Slurm time limit: MM, HH:MM:SS or D-HH:MM:SS",
    SLURM_MEM: "a Slurm memory size such as 32G or 16000M",
    EXTRA_SBATCH: "an sbatch option like --constraint=t4 (letters, digits and . _ , : = / @ + - in the value)",
}


class ClusterSpec(_Strict):
    """Where and how jobs run on Slurm. Values in #SBATCH lines are restricted; the rest is shell-quoted."""

    profile: str = "cpu"
    """Hardware profile: t4-16gb | a100-40gb | a100-80gb | h100-80gb | cpu."""
    partition: str | None = Field(None, pattern=SAFE_SBATCH)
    account: str | None = Field(None, pattern=SAFE_SBATCH)
    qos: str | None = Field(None, pattern=SAFE_SBATCH)
    time: str = Field("00:30:00", pattern=SLURM_TIME)
    """Slurm time limit: MM, HH:MM:SS or D-HH:MM:SS."""
    nodes: PositiveInt | None = None
    """Nodes per run; by default ranks / gpus_per_node."""
    gpus_per_node: int = Field(1, ge=0)
    """GPUs (one rank each) per node; 0 on the cpu profile (one rank per node)."""
    network: Literal["10gbe", "25gbe", "100gbe", "infiniband"] = "10gbe"
    """The link between nodes, for `predict` (what the performance model assumes; jobs do not depend on it)."""
    cpus_per_task: PositiveInt | None = None
    mem: str | None = Field(None, pattern=SLURM_MEM)
    modules: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9._/+-]+$")]] = []
    env: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], Annotated[str, Field(pattern=NO_NEWLINE)]] = {}
    extra_sbatch: list[Annotated[str, Field(pattern=EXTRA_SBATCH)]] = []
    python: Annotated[str, Field(pattern=NO_NEWLINE)] = "python3"
    """The Python that runs distinfer on the compute nodes (inside the container when there is one)."""

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str) -> str:
        if value not in HARDWARE:
            raise ValueError(f"unknown hardware profile {value!r}; allowed: {', '.join(HARDWARE)}")
        return value


class ContainerSpec(_Strict):
    """Run the worker inside a container image."""

    runtime: Literal["apptainer", "none"] = "none"
    image: Annotated[str, Field(pattern=NO_NEWLINE)] | None = None
    binds: list[Annotated[str, Field(pattern=NO_NEWLINE)]] = []

    @model_validator(mode="after")
    def _image_needed(self) -> ContainerSpec:
        if self.runtime == "apptainer" and not self.image:
            raise ValueError("runtime apptainer needs 'image' (a .sif file)")
        return self


class Experiment(_Strict):
    """One experiment file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    study: Study = "matrix"
    """What the experiment shows; the analysis leads with it, and validation checks it sweeps what it needs."""
    model: ModelSpec
    prompts: str | PromptSetSpec
    """A JSONL prompt file, or a long-context prompt set built from a text file."""
    prompts_per_rank: PositiveInt | None = None
    """weak-scaling: a run with n ranks gets the first n x this many prompts (the file repeats if shorter)."""
    reference: Literal["auto", "none"] = "auto"
    """auto: plan a single-device reference run (same batch size and precision) for every other run, so
    correctness can be checked; none: only the runs listed."""
    accuracy: AccuracySpec = AccuracySpec()
    generation: GenerationSpec = GenerationSpec()
    parallel: ParallelSpec = ParallelSpec()
    batch_size: PositiveInt | list[PositiveInt] = 1
    benchmark: BenchmarkSpec = BenchmarkSpec()
    cluster: ClusterSpec = ClusterSpec()
    container: ContainerSpec = ContainerSpec()
    scenario: ScenarioSpec = ScenarioSpec()
    """offline (fixed batches) or serving (requests arriving at a server): scenario.py."""
    endpoint: EndpointSpec | None = None
    """Measure this OpenAI-compatible server (serving scenarios) instead of starting distinfer's engines."""
    vllm: VllmSpec = VllmSpec()
    """engine vllm: how `vllm serve` is started."""

    @field_validator("prompts")
    @classmethod
    def _prompts_path(cls, value: str | PromptSetSpec) -> str | PromptSetSpec:
        path = value if isinstance(value, str) else value.texts
        if "\n" in path or not path.strip():
            raise ValueError("must be a non-empty path without newlines")
        return value


def layer_lists(parallel: ParallelSpec) -> list[list[int]]:
    """The explicit per-stage layer lists (a sweep axis); empty for 'auto'."""
    layers = parallel.layers
    return [] if layers == "auto" else (layers if isinstance(layers[0], list) else [layers])  # type: ignore[return-value]


def as_list(value: object) -> list:
    """A sweep field's values: a scalar becomes a one-element list."""
    return list(value) if isinstance(value, list) else [value]


def _section(annotation: object) -> type[BaseModel] | None:
    """The model class of a nested section's annotation (`X` or `X | None`), else None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _all_field_names(model: type[BaseModel] | None = None) -> set[str]:
    """Every field name of the experiment schema, at any depth."""
    model = model or Experiment
    names = set(model.model_fields)
    for field in model.model_fields.values():
        section = _section(field.annotation)
        if section is not None:
            names |= _all_field_names(section)
    return names


# What a sweep field accepts, said once for every error on it.
SWEEP_HINTS = {
    "batch_size": "an integer >= 1 or a list of them",
    "parallel.pp": "an integer >= 1 or a list of them",
    "parallel.microbatches": "an integer >= 1 or a list of them",
    "parallel.engine": "pipeline | reference | deepspeed | vllm, or a list of them",
    "parallel.tp": "an integer >= 1 or a list of them",
    "parallel.layers": "auto, a list of layer counts per stage, or a list of such lists",
    "model.dtype": "float32 | float16 | bfloat16 | int8, or a list of them",
    "prompts": "a JSONL file path, or {texts: FILE, context_tokens: N or [N, ...], count: N}",
    "prompts.context_tokens": "an integer >= 1 or a list of them",
    "scenario.rate": "a number > 0 or inf, or a list of them (requests per second)",
    "scenario.concurrency": "an integer >= 1 or a list of them (users)",
}


def _field_name(loc: tuple) -> str:
    """Dotted field path without pydantic's union-member tags ('constrained-int', 'list[...]')."""
    names = _all_field_names()
    parts = [f"[{p}]" if isinstance(p, int) else str(p) for p in loc if isinstance(p, int) or p in names]
    return ".".join(parts).replace(".[", "[") or "(top level)"


def _allowed_fields(loc: tuple) -> list[str]:
    model: type[BaseModel] = Experiment
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        section = _section(field.annotation) if field is not None else None
        if section is None:
            return []
        model = section
    return list(model.model_fields)


def _format_error(path: Path, error: dict) -> str:
    loc = tuple(error["loc"])
    field = _field_name(loc)
    if error["type"] == "extra_forbidden":
        field = ".".join(str(p) for p in loc)
        allowed = _allowed_fields(loc)
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        return f"{path}: unknown field '{field}'{suggestion}; allowed here: {', '.join(allowed)}"
    if error["type"] == "missing":
        return f"{path}: field '{field}' is required"
    if error["type"] == "string_pattern_mismatch":
        pattern = error.get("ctx", {}).get("pattern", "")
        help_text = PATTERN_HELP.get(pattern, f"must match {pattern}")
        return f"{path}: field '{field}': {help_text} (got {error.get('input')!r})"
    base = re.sub(r"\[\d+\]", "", field)
    allowed = f"; allowed: {SWEEP_HINTS[base]}" if base in SWEEP_HINTS else ""
    return f"{path}: field '{field}': {error['msg']} (got {error.get('input')!r}){allowed}"


MAX_YAML_VALUES = 100_000  # values an experiment file may expand to through aliases (a real one has hundreds)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would keep the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise SpecError(f"field {key!r} is given twice (lines {seen[key] + 1} and "
                                    f"{key_node.start_mark.line + 1}); give each field once")
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(data: object, limit: int) -> int:
    """How many values `data` holds once every alias is expanded, counting shared objects once per use (stops
    counting past `limit`); memoised by identity, so a billion-value alias bomb is measured in microseconds."""
    sizes: dict[int, int] = {}

    def size(value: object) -> int:
        if not isinstance(value, (dict, list)):
            return 1
        key = id(value)
        if key not in sizes:
            sizes[key] = limit + 1  # a cycle counts as too large
            items = list(value.values()) if isinstance(value, dict) else value
            total = 1
            for item in items:
                total += size(item)
                if total > limit:
                    break
            sizes[key] = min(total, limit + 1)
        return sizes[key]

    return size(data)


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"{path}: experiment file not found") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = getattr(exc, "context_mark", None)
        if context is not None and mark is not None and context.line != mark.line:
            opened = (getattr(exc, "context", "") or "block").removeprefix("while parsing ").removeprefix("a ")
            where += f" (in the {opened} opened at line {context.line + 1})"
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{path}: YAML syntax error{where}: {problem}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping of fields (name, model, prompts, ...), got {type(data).__name__}")
    if _expanded_size(data, MAX_YAML_VALUES) > MAX_YAML_VALUES:
        raise SpecError(f"{path}: the file expands to more than {MAX_YAML_VALUES:,} values through YAML aliases "
                        "(&anchor / *alias); write the values out or use fewer aliases")
    return data


def resolve_path(value: str, spec_file: Path) -> Path:
    """Relative paths are tried against the current directory, then against the experiment file's folder."""
    candidate = Path(value).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate.resolve() if candidate.exists() else candidate
    beside = (spec_file.parent / candidate)
    return beside.resolve() if beside.exists() else candidate


def _check_layout(path: Path, exp: Experiment, num_layers: int) -> None:
    layers = exp.parallel.layers
    if layers != "auto":
        lists = layer_lists(exp.parallel)
        for stages in lists:
            if sum(stages) != num_layers:
                raise SpecError(
                    f"{path}: field 'parallel.layers': {stages} sums to {sum(stages)}, but the model has "
                    f"{num_layers} decoder layers; the per-stage counts must add up to {num_layers}"
                )
        pp_values = as_list(exp.parallel.pp)
        if "pp" in exp.parallel.model_fields_set and any(len(s) not in pp_values for s in lists):
            raise SpecError(
                f"{path}: field 'parallel.layers': each layer list needs one entry per stage; "
                f"pp is {pp_values} but the lists have {sorted({len(s) for s in lists})} entries"
            )
    for pp in as_list(exp.parallel.pp):
        if pp > num_layers:
            raise SpecError(
                f"{path}: field 'parallel.pp': {pp} stages for a model with {num_layers} decoder layers; "
                f"allowed: 1..{num_layers}"
            )
    engines = as_list(exp.parallel.engine)
    if not taking(engines, "pp") and (as_list(exp.parallel.pp) != [1] or layers != "auto"):
        raise SpecError(f"{path}: field 'parallel.pp': pipeline stages need engine {named(taking(SELECTABLE, 'pp'))}; "
                        f"engines here: {', '.join(engines)}")
    if not taking(engines, "tp") and as_list(exp.parallel.tp) != [1]:
        raise SpecError(f"{path}: field 'parallel.tp': tensor parallelism needs engine "
                        f"{named(taking(SELECTABLE, 'tp'))}; engines here: {', '.join(engines)}")
    for engine in engines:
        least = capabilities(engine).min_tp
        if max(as_list(exp.parallel.tp)) < least:
            raise SpecError(f"{path}: field 'parallel.tp': engine {engine} splits the model over tp >= {least} ranks "
                            f"(with tp 1 it is the reference); set parallel.tp, e.g. {least}")
    if as_list(exp.parallel.ep) != [1]:
        if not taking(engines, "ep"):
            raise SpecError(f"{path}: field 'parallel.ep': expert parallelism needs engine "
                            f"{named(taking(SELECTABLE, 'ep'))}; engines here: {', '.join(engines)}")
        if as_list(exp.parallel.tp) != [1]:
            raise SpecError(f"{path}: field 'parallel.ep': expert parallel stages run with tp 1; got tp "
                            f"{as_list(exp.parallel.tp)}")
    serving = exp.scenario.kind == "serving"  # a server's groups of requests share scenario.max_batch
    limits = [exp.scenario.max_batch] if serving else as_list(exp.batch_size)
    for mb in as_list(exp.parallel.microbatches):
        for bs in limits:
            if mb > bs and serving:
                raise SpecError(f"{path}: field 'parallel.microbatches': {mb} groups of requests cannot share "
                                f"scenario.max_batch {bs}; allowed: 1..{bs}")
            if mb > bs:
                raise SpecError(
                    f"{path}: field 'parallel.microbatches': {mb} micro-batches cannot split batch_size {bs}; "
                    f"allowed: 1..{bs}"
                )


def run_layouts(exp: Experiment) -> list[tuple[str, Layout]]:
    """Every (engine, layout) the matrix runs, once each, placed on the experiment's cluster; LayoutError for
    the first that cannot be placed. Single-device reference runs take one node whatever `cluster.nodes` says."""
    profile = HARDWARE[exp.cluster.profile]
    return [(engine, place_engine(engine, pp, tp, ep, gpu=profile.gpu, gpus_per_node=exp.cluster.gpus_per_node,
                                  nodes=exp.cluster.nodes))
            for engine, pp, tp, ep in _shapes(exp)]


def _shapes(exp: Experiment) -> list[tuple[str, int, int, int]]:
    """Every (engine, pp, tp, ep) of the matrix once, each engine's axes as engines.py says."""
    explicit = layer_lists(exp.parallel)
    stage_counts = sorted({len(s) for s in explicit} if explicit else set(as_list(exp.parallel.pp)))
    shapes: dict[tuple[str, int, int, int], None] = {}
    for engine, pp, tp, ep in itertools.product(as_list(exp.parallel.engine), stage_counts, as_list(exp.parallel.tp),
                                                as_list(exp.parallel.ep)):
        axes = capabilities(engine).axes(pp, None, 1, tp, ep)  # the axes the engine does not take are 1
        if axes is not None:
            shapes[(engine, axes[0], axes[3], axes[4])] = None
    return list(shapes)


def _check_cluster(path: Path, exp: Experiment) -> None:
    profile = HARDWARE[exp.cluster.profile]
    for dtype in as_list(exp.model.dtype):
        if dtype != "int8" and dtype not in profile.dtypes:
            raise SpecError(
                f"{path}: field 'model.dtype': {dtype} is not supported on {profile.name} "
                f"({profile.note or 'see the profile'}); allowed: {', '.join(profile.dtypes)}, int8"
            )
    if profile.gpu and exp.cluster.gpus_per_node == 0:
        raise SpecError(f"{path}: field 'cluster.gpus_per_node': the {profile.name} profile needs at least 1")
    try:
        run_layouts(exp)
    except LayoutError as exc:
        raise SpecError(f"{path}: field '{exc.field}': {exc}") from None


def load_experiment(path: str | Path, require_model: bool = True) -> Experiment:
    """Read and validate an experiment file, including checks against the model and prompts on disk.

    With require_model=False (planning for a cluster) a model folder that is not reachable from here
    is accepted: its facts come from `model.config` if given, and the job on the cluster will say.
    """
    path = Path(path)
    data = _read_yaml(path)
    try:
        exp = Experiment.model_validate(data)
    except ValidationError as exc:
        # In a union (value or list of values) the deepest error is the specific one, e.g. batch_size[1].
        deepest = max(exc.errors(), key=lambda e: len(e["loc"]))
        raise SpecError(_format_error(path, deepest)) from None
    _check_prompts(path, exp)
    num_layers: int | None = None
    config: dict | None = None  # the model's config.json, read once for the layer count and the positions
    if exp.model.builtin is not None:
        config = TINY_MODELS[exp.model.builtin].config
        num_layers = config_layer_count(config, exp.model.builtin)
    elif exp.model.config is not None:
        config_file = resolve_path(exp.model.config, path)
        try:
            config = read_json_file(config_file)
            num_layers = config_layer_count(config, str(config_file))
        except ValueError as exc:
            raise SpecError(f"{path}: field 'model.config': {exc}") from None
    else:
        model_dir = resolve_path(str(exp.model.path), path)
        try:
            found = read_model_config(model_dir)
            num_layers = config_layer_count(found, f"{model_dir}/config.json")
            config = found
        except ValueError as exc:
            if require_model or model_dir.exists():
                raise SpecError(f"{path}: field 'model.path': {exc}") from None
    if config is not None:
        _check_context(path, exp, config)
        _check_tensor_parallel(path, exp, config)
        _check_experts(path, exp, config)
    if num_layers is not None:
        _check_layout(path, exp, num_layers)
    _check_study(path, exp)
    _check_serving(path, exp)
    if "cluster" in exp.model_fields_set:
        _check_cluster(path, exp)
    return exp


def _check_serving(path: Path, exp: Experiment) -> None:
    """A serving scenario measures a server: the offline-only fields and sweeps make no sense with it."""
    serving = exp.scenario.kind == "serving"
    if exp.endpoint is not None and not serving:
        raise SpecError(f"{path}: field 'endpoint': an endpoint is measured by a serving scenario; "
                        "set scenario.kind: serving (with a rate or a concurrency)")
    if not serving:
        return
    against = "an endpoint" if exp.endpoint is not None else "distinfer's server"
    offline_only = [name for name, wanted in (
        ("prompts_per_rank", exp.prompts_per_rank is not None),
        ("batch_size", "batch_size" in exp.model_fields_set),
        ("parallel", exp.endpoint is not None and "parallel" in exp.model_fields_set),
        ("benchmark.repeats", exp.benchmark.repeats != 1),
        ("benchmark.warmup", "warmup" in exp.benchmark.model_fields_set),
        ("accuracy", "accuracy" in exp.model_fields_set),
        ("study", exp.study not in ("matrix",)),
        ("model.dtype", exp.endpoint is not None and isinstance(exp.model.dtype, list)),
    ) if wanted]
    if offline_only:
        raise SpecError(f"{path}: field '{offline_only[0]}': not used by a serving scenario against {against} "
                        "(the server batches requests itself, up to scenario.max_batch; warm-up is "
                        "scenario.warmup_requests); remove it")
    if exp.endpoint is None:  # every engine serves (vllm through `vllm serve`)
        if as_list(exp.parallel.ep) != [1]:
            raise SpecError(f"{path}: field 'parallel.ep': distinfer's server runs pipeline stages of one rank "
                            "(ep 1)")
        unsplit = [e for e in taking(as_list(exp.parallel.engine), "tp") if not capabilities(e).serves_tp]
        if unsplit and as_list(exp.parallel.tp) != [1]:
            raise SpecError(f"{path}: field 'parallel.tp': distinfer's server runs {unsplit[0]} stages of one rank "
                            f"(tp 1); serve tensor parallel with engine {named(taking(SELECTABLE, 'serves_tp'))}")


def _check_tensor_parallel(path: Path, exp: Experiment, config: dict) -> None:
    """Every tp of the sweep splits the model's heads, its key/value heads and its MLP."""
    if not taking(as_list(exp.parallel.engine), "tp"):
        return
    for tp in as_list(exp.parallel.tp):
        if tp > 1:
            problem = tensor_split_problem(config, tp)
            if problem:
                raise SpecError(f"{path}: field 'parallel.tp': {problem}")


def _check_experts(path: Path, exp: Experiment, config: dict) -> None:
    """ep > 1 needs a mixture-of-experts model whose experts it divides."""
    eps = [ep for ep in as_list(exp.parallel.ep) if ep > 1]
    if not eps:
        return
    experts = config.get("num_local_experts") or config.get("num_experts")
    if not experts:
        raise SpecError(f"{path}: field 'parallel.ep': expert parallelism needs a mixture-of-experts model; this "
                        "one is dense (its config has no num_local_experts)")
    for ep in eps:
        if int(experts) % ep:
            raise SpecError(f"{path}: field 'parallel.ep': ep {ep} does not divide the model's {experts} experts")


def _check_context(path: Path, exp: Experiment, config: dict) -> None:
    """Prompt + new tokens must fit the model's positions (OpenLLaMA-3B v2: 2048)."""
    limit = max_positions(config)
    if limit is None:
        return
    new = exp.generation.max_new_tokens
    if isinstance(exp.prompts, str):
        prompt, field = exp.generation.max_prompt_tokens, "generation.max_prompt_tokens"
    else:
        prompt, field = max(as_list(exp.prompts.context_tokens)), "prompts.context_tokens"
    if prompt is None and new >= limit:  # a prompt has at least one token
        raise SpecError(f"{path}: field 'generation.max_new_tokens': {new} new tokens leave no room for a prompt in "
                        f"the model's {limit} positions; allowed: 1..{limit - 1} (minus the prompt's tokens)")
    if prompt is not None and prompt + new > limit:
        raise SpecError(f"{path}: field '{field}': {prompt} prompt tokens + {new} new tokens exceed the model's "
                        f"{limit} positions; allowed: prompt + max_new_tokens <= {limit}")


def _check_prompts(path: Path, exp: Experiment) -> None:
    field = "prompts" if isinstance(exp.prompts, str) else "prompts.texts"
    source = exp.prompts if isinstance(exp.prompts, str) else exp.prompts.texts
    file = resolve_path(source, path)
    if not file.is_file():
        raise SpecError(f"{path}: field '{field}': file not found: {source}")
    try:
        if isinstance(exp.prompts, str):
            load_prompts(file)
        else:
            read_paragraphs(file)
    except PromptFileError as exc:
        raise SpecError(f"{path}: field '{field}': {exc}") from None
    if exp.accuracy.perplexity_text is not None and not resolve_path(exp.accuracy.perplexity_text, path).is_file():
        raise SpecError(f"{path}: field 'accuracy.perplexity_text': file not found: {exp.accuracy.perplexity_text}")


def world_sizes(exp: Experiment) -> set[int]:
    """The rank counts the matrix covers (each engine's layouts: its axes as engines.py says)."""
    return {world_size(pp, tp, ep) for _, pp, tp, ep in _shapes(exp)}


def swept_axes(exp: Experiment) -> list[str]:
    """The sweep fields that hold more than one value."""
    par = exp.parallel
    layouts = layer_lists(par)
    axes = {"parallel.engine": par.engine, "parallel.pp": par.pp, "parallel.tp": par.tp, "parallel.ep": par.ep,
            "parallel.microbatches": par.microbatches, "batch_size": exp.batch_size, "model.dtype": exp.model.dtype,
            "parallel.layers": layouts if len(layouts) > 1 else None}
    if not isinstance(exp.prompts, str):
        axes["prompts.context_tokens"] = exp.prompts.context_tokens
    return [name for name, value in axes.items() if isinstance(value, list) and len(value) > 1]


def _check_study(path: Path, exp: Experiment) -> None:
    """A named study must sweep what it is about; int8 and prompts_per_rank only where they work."""
    need = {
        "strong-scaling": (len(world_sizes(exp)) >= 2, "parallel.pp", "at least two rank counts, e.g. pp: [1, 2, 3]"),
        "weak-scaling": (len(world_sizes(exp)) >= 2, "parallel.pp", "at least two rank counts, e.g. pp: [1, 2, 3]"),
        "batch-sweep": (len(as_list(exp.batch_size)) >= 2, "batch_size", "at least two batch sizes"),
        "precision-sweep": (len(as_list(exp.model.dtype)) >= 2, "model.dtype",
                            "at least two precisions, e.g. [float32, float16, int8]"),
        "optimization": (len(swept_axes(exp)) == 1, "parallel",
                         f"exactly one swept field (the change; its first value is the baseline), "
                         f"got {swept_axes(exp) or 'none'}"),
    }
    ok, field, what = need.get(exp.study, (True, "", ""))
    if not ok:
        raise SpecError(f"{path}: field '{field}': a {exp.study} study needs {what}")
    if exp.study == "weak-scaling" and exp.prompts_per_rank is None:
        raise SpecError(f"{path}: field 'prompts_per_rank': a weak-scaling study needs it (prompts per rank, "
                        "so that the work grows with the ranks)")
    if exp.prompts_per_rank is not None and exp.study != "weak-scaling":
        raise SpecError(f"{path}: field 'prompts_per_rank': only used by study: weak-scaling (here: {exp.study})")
    engines = as_list(exp.parallel.engine)
    for engine in sorted(set(engines) - set(taking(engines, "int8"))):
        if "int8" in as_list(exp.model.dtype):
            raise SpecError(f"{path}: field 'model.dtype': int8 (torchao weight-only) runs on the "
                            f"{' and '.join(taking(SELECTABLE, 'int8'))} engines, not {engine}; drop one of them")
    vllm = [e for e in engines if capabilities(e).program == "vllm"]
    if not vllm and "vllm" in exp.model_fields_set:
        raise SpecError(f"{path}: field 'vllm': only used by engine vllm (parallel.engine); remove it or add vllm")
    if vllm and exp.model.trust_remote_code:
        raise SpecError(f"{path}: field 'model.trust_remote_code': engine vllm loads the model with vLLM's own "
                        "model code; add --trust-remote-code to vllm.args if vLLM should run the checkpoint's")
