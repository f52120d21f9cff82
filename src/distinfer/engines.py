"""The engines and what each one takes, in one table read by validation, planning, placement, prediction,
serving and analysis alike (as optimum-benchmark's backend configs). Adding an engine means adding its entry
here and its runner (runtime/engines.py for the ranks' engines, or its own program, as vLLM's).

Plain data, no torch: the login-node commands read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Program = Literal["ranks", "vllm", "endpoint"]  # who runs it: distinfer's ranks, `vllm serve`, someone's server
Groups = Literal["microbatches", "stages", "one"]  # groups of requests a server keeps in flight


@dataclass(frozen=True)
class EngineCapabilities:
    """What one engine takes. A layout axis it does not take is 1 in its runs, and its run ids leave it out."""

    name: str
    about: str
    pp: bool = False
    """Pipeline stages (`parallel.pp`, `parallel.layers`)."""
    tp: bool = False
    """Tensor-parallel ranks (per stage where the engine also takes pp)."""
    ep: bool = False
    """Expert-parallel ranks per stage (mixture-of-experts models)."""
    microbatches: bool = False
    """Micro-batches offline, groups of requests in flight when serving."""
    min_tp: int = 1
    """The least tp a run of the engine has; a sweep's smaller values are another engine's runs."""
    program: Program = "ranks"
    served_by_distinfer: bool = True
    """`distinfer serve` and the serving runs put distinfer's server in front of it."""
    single_device: bool = False
    """One device whatever the cluster (the reference baseline)."""
    one_node_on_cpu: bool = False
    """Its CPU build runs all ranks on one machine."""
    serving_groups: Groups = "one"
    """Groups of requests in flight when served: the micro-batches (at least one per stage), one per stage (as
    vLLM keeps pp batches in flight), or one."""
    fast_cpu_kernels: bool = False
    """Its CPU ranks decode through runtime/cpu's fused layers."""
    deepspeed_config: bool = False
    """Its bundle carries a DeepSpeed config (ds_config.json)."""
    int8: bool = False
    """Offers int8 weights (torchao weight-only) as a precision."""
    serves_tp: bool = False
    """Its server splits the model over tp ranks (distinfer's server runs pipeline stages of one rank each)."""
    selectable: bool = True
    """A value of `parallel.engine` (an endpoint run comes from the experiment's `endpoint` section)."""

    def axes(self, pp: int, layers: list[int] | None, microbatches: int, tp: int, ep: int
             ) -> tuple[int, list[int] | None, int, int, int] | None:
        """(pp, layers, microbatches, tp, ep) of a run of this engine from the sweep's values: the axes it does not
        take set to 1 (no layer list); None where tp is below the engine's least."""
        if self.tp and tp < self.min_tp:
            return None
        return (pp if self.pp else 1, layers if self.pp else None, microbatches if self.microbatches else 1,
                tp if self.tp else 1, ep if self.ep else 1)

    def layout_tag(self, pp: int, layers: list[int] | None, tp: int, ep: int) -> str:
        """The layout part of a run id: pp always where the engine takes stages, an explicit layer list, tp and ep
        where above 1 (or always, for an engine whose least tp is above 1)."""
        tag = f"-pp{pp}" if self.pp else ""
        tag += f"-L{'.'.join(map(str, layers))}" if self.pp and layers else ""
        tag += f"-tp{tp}" if self.tp and (tp > 1 or self.min_tp > 1) else ""
        return tag + (f"-ep{ep}" if self.ep and ep > 1 else "")

    def groups(self, pp: int, microbatches: int) -> int:
        """Groups of requests its server keeps in flight."""
        return {"microbatches": max(pp, microbatches), "stages": pp, "one": 1}[self.serving_groups]

    def one_rank(self, pp: int, tp: int, ep: int) -> bool:
        """A run on one rank: what calibration fits an engine on (no messages between stages, no collectives)."""
        return self.single_device or (self.program != "endpoint" and pp == 1 and tp == 1 and ep == 1
                                      and self.min_tp == 1)


ENGINES: dict[str, EngineCapabilities] = {e.name: e for e in (
    EngineCapabilities("pipeline", "distinfer's own engine: pipeline stages, tensor and expert parallel inside them",
                       pp=True, tp=True, ep=True, microbatches=True, serving_groups="microbatches",
                       fast_cpu_kernels=True, int8=True),
    EngineCapabilities("reference", "transformers' generate on one device: the baseline and the correctness reference",
                       single_device=True, int8=True),
    EngineCapabilities("deepspeed", "DeepSpeed inference with AutoTP tensor parallelism", tp=True, min_tp=2,
                       deepspeed_config=True, serves_tp=True),
    EngineCapabilities("vllm", "vLLM's server (`vllm serve`), in its own environment or image", pp=True, tp=True,
                       program="vllm", served_by_distinfer=False, one_node_on_cpu=True, serving_groups="stages",
                       serves_tp=True),
    EngineCapabilities("endpoint", "someone else's OpenAI-compatible server (the experiment's `endpoint`)",
                       program="endpoint", served_by_distinfer=False, selectable=False),
)}
SELECTABLE = tuple(name for name, e in ENGINES.items() if e.selectable)
REFERENCE = next(name for name, e in ENGINES.items() if e.single_device)  # the baseline every run is checked against
SERVED_BY_DISTINFER = tuple(name for name, e in ENGINES.items() if e.served_by_distinfer)


def taking(engines: list[str], axis: str) -> list[str]:
    """The engines among `engines` whose capability `axis` (pp, tp, ep, int8, ...) holds."""
    return [e for e in engines if getattr(capabilities(e), axis)]


def named(engines: list[str] | tuple[str, ...]) -> str:
    """'pipeline or vllm', for messages."""
    return " or ".join([", ".join(engines[:-1]), engines[-1]] if len(engines) > 1 else list(engines))


def program_of(engine: object) -> Program:
    """Who runs a run of `engine` (a bundle's value, read as it is: an unknown one counts as distinfer's ranks)."""
    known = ENGINES.get(engine) if isinstance(engine, str) else None
    return known.program if known else "ranks"


def capabilities(engine: str) -> EngineCapabilities:
    """The entry of `engine`; ValueError naming the known engines otherwise."""
    try:
        return ENGINES[engine]
    except KeyError:
        raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}") from None
