"""The experiment file's schema: typed sections (pydantic) with their defaults and per-field checks.

No torch: validation runs on a login node in milliseconds. Cross-field checks: spec_checks.py; reading the YAML
safely: spec_yaml.py; error messages: spec_errors.py; the entry point: spec.load_experiment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from distinfer.engines import SELECTABLE
from distinfer.profiles import HARDWARE
from distinfer.scenario import EndpointSpec, ScenarioSpec


class SpecError(Exception):
    """A bad experiment file: the message names the file, the field and what is allowed."""


PositiveInt = Annotated[int, Field(ge=1)]
Dtype = Literal["float32", "float16", "bfloat16", "int8"]
Study = Literal["matrix", "strong-scaling", "weak-scaling", "batch-sweep", "precision-sweep", "optimization"]
Engine = Literal[SELECTABLE]  # type: ignore[valid-type] - the engine table's selectable names (engines.py)
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



def resolve_path(value: str, spec_file: Path) -> Path:
    """Relative paths are tried against the current directory, then against the experiment file's folder."""
    candidate = Path(value).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate.resolve() if candidate.exists() else candidate
    beside = (spec_file.parent / candidate)
    return beside.resolve() if beside.exists() else candidate


