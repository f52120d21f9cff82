"""The load a run measures: offline batches (the default) or requests arriving at a server (`kind: serving`).

A serving scenario is an open loop at request rates (a sweep axis; `inf` sends everything at once) with
Poisson or gamma arrivals, or a closed loop of concurrent users (a sweep axis); a number of measured requests
and/or a duration; warm-up requests; prompts from the experiment's prompt file or synthetic ones of given
input and output lengths; and service-level objectives for goodput. `endpoint` points the load at an
OpenAI-compatible server the user already runs. Pure: no torch.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SLO_VALUE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s)\s*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


def slo_seconds(value: str) -> float:
    """'200ms' or '1.5s' -> seconds; ValueError naming the units otherwise."""
    match = SLO_VALUE.match(str(value))
    if not match:
        raise ValueError(f"{value!r} needs a unit: a number with ms or s, e.g. 200ms or 1.5s")
    number, unit = float(match.group(1)), match.group(2)
    if number <= 0:
        raise ValueError(f"{value!r} must be above 0")
    return number / 1000 if unit == "ms" else number


class SLOSpec(_Strict):
    """Latency limits a request must meet to count for goodput: '200ms', '1.5s'."""

    ttft: str | None = None
    tpot: str | None = None
    e2e: str | None = None

    @field_validator("ttft", "tpot", "e2e", mode="before")
    @classmethod
    def _unit(cls, value: object) -> object:
        if value is not None:
            slo_seconds(str(value))
            return str(value)
        return value

    def seconds(self) -> dict[str, float]:
        return {k: slo_seconds(v) for k, v in (("ttft", self.ttft), ("tpot", self.tpot), ("e2e", self.e2e)) if v}


class LengthSpec(_Strict):
    """Token counts drawn uniformly from mean x (1 - spread) .. mean x (1 + spread), clipped to min .. max."""

    mean: Annotated[int, Field(ge=1)]
    spread: Annotated[float, Field(ge=0, le=1)] = 0.0
    min: Annotated[int, Field(ge=1)] = 1
    max: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _ordered(self) -> LengthSpec:
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max {self.max} is below min {self.min}")
        return self


class SyntheticSpec(_Strict):
    """Prompts of random token ids (sent as token-id prompts, so their length is exact)."""

    input_tokens: LengthSpec
    output_tokens: LengthSpec
    vocab_size: Annotated[int, Field(ge=2)] | None = None
    """Token ids are drawn below this; default: the model's vocabulary."""


Rate = float | Literal["inf"]


class LoadSettings(_Strict):
    """How a load is sent and limited, with every default in one place: the experiment's `scenario` and each
    serving run's `RunLoad` share these fields; an offline run sent through a server uses the defaults."""

    arrivals: Literal["poisson", "gamma"] = "poisson"
    burstiness: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    """Gamma arrivals' shape: below 1 burstier than Poisson, above 1 more even."""
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0
    requests: Annotated[int, Field(ge=1)] | None = None
    """Measured requests (default 64; with duration_s alone, as many as the rate sends in that time)."""
    duration_s: Annotated[float, Field(gt=0)] | None = None
    warmup_requests: Annotated[int, Field(ge=0)] = 1
    input: Literal["prompts", "synthetic"] = "prompts"
    synthetic: SyntheticSpec | None = None
    ignore_eos: bool = False
    """Every request generates its full length (max_new_tokens, or the synthetic output length)."""
    slo: SLOSpec = SLOSpec()
    timeout_s: Annotated[float, Field(gt=0)] = 600.0
    """A request without an answer after this long counts as an error."""
    max_batch: Annotated[int, Field(ge=1)] = 32
    """distinfer's server: requests decoded together at most (more wait to join)."""
    health_timeout_s: Annotated[float, Field(gt=0)] | None = None
    """How long the run's own server may take to load and answer /health before the run fails (default: 300 s
    for distinfer's server, 900 s for vLLM's, which may compile)."""


class ScenarioSpec(LoadSettings):
    """The workload: offline batches, or a serving load (list values are sweep axes)."""

    kind: Literal["offline", "serving"] = "offline"
    rate: Rate | list[Rate] | None = None
    """Requests per second (open loop); 'inf' sends every request at once."""
    concurrency: Annotated[int, Field(ge=1)] | list[Annotated[int, Field(ge=1)]] | None = None
    """Users that each send their next request when the last one ended (closed loop)."""

    @field_validator("rate", mode="before")
    @classmethod
    def _rates(cls, value: object) -> object:
        for rate in value if isinstance(value, list) else [value]:
            if rate is None or rate == "inf":
                continue
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (rate > 0):
                raise ValueError(f"a request rate must be a number above 0 or inf (got {rate!r})")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ScenarioSpec:
        if self.kind == "offline":
            set_fields = {"rate", "concurrency", "requests", "duration_s", "synthetic", "slo"} & self.model_fields_set
            if set_fields:
                raise ValueError(f"{', '.join(sorted(set_fields))} belong to a serving scenario; set kind: serving")
            return self
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("a serving scenario needs exactly one of rate (open loop) or concurrency (closed loop)")
        if self.arrivals == "poisson" and "burstiness" in self.model_fields_set and self.burstiness != 1.0:
            raise ValueError("burstiness needs arrivals: gamma (Poisson arrivals have burstiness 1)")
        if (self.input == "synthetic") != (self.synthetic is not None):
            raise ValueError("input: synthetic goes with a `synthetic` section (input_tokens, output_tokens), "
                             "and a `synthetic` section with input: synthetic")
        return self

    def loads(self) -> list[tuple[str, float | int]]:
        """The sweep: ("rate", r) per rate (inf as math.inf) or ("concurrency", c) per user count."""
        if self.rate is not None:
            rates = self.rate if isinstance(self.rate, list) else [self.rate]
            return [("rate", math.inf if r == "inf" else float(r)) for r in rates]
        users = self.concurrency if isinstance(self.concurrency, list) else [self.concurrency]
        return [("concurrency", int(c)) for c in users or []]


class RunLoad(LoadSettings):
    """A serving run's load: the experiment's scenario with this run's rate or user count (run.json's
    `scenario`), and its SLOs in seconds."""

    kind: Literal["serving"] = "serving"
    load: Literal["rate", "concurrency"]
    value: float | int | Literal["inf"]
    """The rate in requests/s ('inf': every request at once) or the number of users."""
    slo_s: dict[str, float] = {}

    @property
    def rate(self) -> float | None:
        """Requests per second of an open loop (math.inf for 'inf'); None for users."""
        if self.load != "rate":
            return None
        return math.inf if self.value == "inf" else float(self.value)

    @property
    def users(self) -> int | None:
        """Users of a closed loop; None for a rate."""
        return int(self.value) if self.load == "concurrency" else None

    @classmethod
    def of(cls, scenario: ScenarioSpec, kind: str, value: float | int) -> RunLoad:
        """The run of `scenario` at one load of its sweep (`inf` kept as the string, for JSON)."""
        shared = scenario.model_dump(include=set(LoadSettings.model_fields))
        return cls(**shared, load=kind, value="inf" if value == math.inf else value, slo_s=scenario.slo.seconds())


class EndpointSpec(_Strict):
    """An OpenAI-compatible server to measure instead of starting one (vLLM, TGI, SGLang, llama.cpp, ...)."""

    url: Annotated[str, Field(pattern=r"^https?://[^\s]+$")]
    """Its base URL, e.g. http://127.0.0.1:8000."""
    model: Annotated[str, Field(min_length=1)]
    """The model name the server serves (the request's `model`)."""
    api_key_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    """The environment variable that holds the API key; the key itself is never written anywhere."""


def load_tag(kind: str, value: float | int) -> str:
    """rate4, rate0.5, rateinf, c8: a run id's load part."""
    if kind == "concurrency":
        return f"c{int(value)}"
    return "rateinf" if math.isinf(value) else f"rate{value:g}"
