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

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

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


Distribution = Literal["fixed", "uniform", "normal", "lognormal"]
MAX_LENGTH = 2**20  # tokens of one prompt or answer at most (the longest context windows); a draw never exceeds it


class LengthSpec(_Strict):
    """Token counts of prompts or answers, drawn per request from a seeded generator and clamped to min..max:
    `mean` alone is fixed; with `spread`, uniform over mean x (1 - spread) .. mean x (1 + spread); with
    `distribution: normal` or `lognormal`, of that mean and `stdev` (lognormal: the lengths' own mean and
    standard deviation, a long right tail as in chat traffic)."""

    mean: Annotated[int, Field(ge=1, le=MAX_LENGTH)]
    distribution: Distribution | None = None
    """Default: uniform where `spread` is above 0, else fixed."""
    spread: Annotated[float, Field(ge=0, le=1)] = 0.0
    stdev: Annotated[float, Field(ge=0, le=MAX_LENGTH, allow_inf_nan=False)] | None = None
    min: Annotated[int, Field(ge=1, le=MAX_LENGTH)] = 1
    max: Annotated[int, Field(ge=1, le=MAX_LENGTH)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> LengthSpec:
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max {self.max} is below min {self.min}")
        kind = self.kind
        if kind in ("normal", "lognormal") and self.stdev is None:
            raise ValueError(f"a {kind} distribution needs stdev (the lengths' standard deviation)")
        if self.stdev is not None and kind not in ("normal", "lognormal"):
            raise ValueError("stdev belongs to distribution: normal or lognormal")
        if self.spread and kind != "uniform":
            raise ValueError(f"spread belongs to distribution: uniform (this one is {kind})")
        if not self.min <= self.mean <= (self.max or self.mean):
            raise ValueError(f"mean {self.mean} is outside min {self.min} .. max {self.max}")
        return self

    @property
    def kind(self) -> Distribution:
        """The distribution drawn from, the default resolved."""
        if self.distribution is not None:
            return self.distribution
        return "uniform" if self.spread else "fixed"

    def largest(self) -> int | None:
        """The longest length a draw can give; None where the tail is unbounded (normal or lognormal, no max)."""
        if self.kind == "fixed":
            return self.mean
        if self.kind == "uniform":
            high = round(self.mean * (1 + self.spread))
            return min(high, self.max) if self.max else high
        return self.max


def _length_spec(value: object) -> object:
    """A bare token count is a fixed length: `input_tokens: 512` is `{mean: 512}`."""
    return {"mean": value} if isinstance(value, int) and not isinstance(value, bool) else value


Length = Annotated[LengthSpec, BeforeValidator(_length_spec)]


class SyntheticSpec(_Strict):
    """Prompts of random token ids (sent as token-id prompts, so their length is exact)."""

    input_tokens: Length
    output_tokens: Length
    vocab_size: Annotated[int, Field(ge=2)] | None = None
    """Token ids are drawn below this; default: the model's vocabulary."""


class SharedPrefixSpec(_Strict):
    """Requests in `groups` that each start with the same prefix of random token ids (a system prompt, a shared
    document), then a suffix of their own: a server that caches prefixes computes each group's prefix once.
    Request i belongs to group i mod groups; a group's prefix length is drawn once."""

    groups: Annotated[int, Field(ge=1, le=100_000)]
    prefix_tokens: Length
    suffix_tokens: Length
    output_tokens: Length
    vocab_size: Annotated[int, Field(ge=2)] | None = None


class ShareGPTSpec(_Strict):
    """Conversations from a file in the ShareGPT layout (serving/sharegpt.py): each record's first question is a
    prompt (text), the answer to it gives the output length in tokens; records outside the length limits are
    left out, as vLLM's sharegpt dataset does with its own limits."""

    file: Annotated[str, Field(min_length=1)]
    """The JSON file (relative paths: from the experiment file's folder)."""
    min_input_tokens: Annotated[int, Field(ge=1)] = 4
    max_input_tokens: Annotated[int, Field(ge=1)] | None = None
    min_output_tokens: Annotated[int, Field(ge=1)] = 4
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _ordered(self) -> ShareGPTSpec:
        for kind in ("input", "output"):
            low, high = getattr(self, f"min_{kind}_tokens"), getattr(self, f"max_{kind}_tokens")
            if high is not None and high < low:
                raise ValueError(f"max_{kind}_tokens {high} is below min_{kind}_tokens {low}")
        return self


class SessionsSpec(_Strict):
    """Multi-turn sessions (serving/sessions.py): each session takes a conversation of a ShareGPT file and asks
    its questions one after another, each turn's prompt holding the whole history (the earlier questions and the
    answers the server actually gave), with a think time between an answer and the next question. Sessions start
    at the scenario's rate or keep its concurrency busy; `requests` counts sessions."""

    file: Annotated[str, Field(min_length=1)]
    """The ShareGPT file whose conversations give the questions (relative paths: from the experiment file)."""
    turns: Length = LengthSpec(mean=4, min=1, max=4)
    """Questions per session (drawn; at most the conversation's own)."""
    think_time_s: Annotated[float, Field(ge=0, le=3600, allow_inf_nan=False)] = 0.0
    output_tokens: Length | None = None
    """Each answer's length; default: the file's answer to that question, in tokens."""


Scale = Annotated[float, Field(gt=0, le=1000, allow_inf_nan=False)]


class TraceSpec(_Strict):
    """A timestamped trace replayed on its own schedule (serving/traces.py): Mooncake's JSONL (timestamp in ms,
    input_length, output_length, hash_ids of 512-token prompt blocks that requests share) or the Azure LLM
    inference CSV (TIMESTAMP, ContextTokens, GeneratedTokens). Prompts are token ids of the trace's lengths;
    `requests` and `duration_s` take the trace's first requests only."""

    file: Annotated[str, Field(min_length=1)]
    format: Literal["mooncake", "azure"] | None = None
    """Default: azure for a .csv file, else mooncake."""
    time_scale: Scale | list[Scale] = 1.0
    """Multiplies the trace's times: 0.5 replays it twice as fast, 2 half as fast (a sweep axis)."""
    block_tokens: Annotated[int, Field(ge=1, le=65536)] = 512
    """Tokens per hash id (Mooncake's blocks)."""
    vocab_size: Annotated[int, Field(ge=2)] | None = None


INPUTS = ("prompts", "synthetic", "shared_prefix", "sharegpt", "sessions", "trace")  # the sections named by `input`


Rate = float | Literal["inf"]


class ClientSpec(_Strict):
    """The load generator itself: where it runs, and when its load counts as delivered."""

    max_lag_ms: Annotated[float, Field(gt=0, le=3_600_000, allow_inf_nan=False)] = 5.0
    """An open-loop load whose dispatch lag (sent - intended) p99 exceeds this is marked invalid."""
    processes: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = "auto"
    """Worker processes on each client host that share the schedule (serving/workers.py). auto: enough for an
    open loop's planned requests and streamed tokens per second (serving/client_size.py), 1 for a closed loop or
    rate inf, whose pace the server sets (a saturated client then marks the load invalid)."""
    nodes: Annotated[int, Field(ge=1, le=1024)] = 1
    """Nodes of the Slurm allocation that send the load, each its share of the schedule, their clocks aligned to
    the first one's (serving/client_nodes.py)."""
    placement: Literal["beside", "apart"] = "beside"
    """Client nodes on the server's nodes (the allocation's first ones), or on nodes of their own after them."""


class LoadSettings(_Strict):
    """How a load is sent and limited, with every default in one place: the experiment's `scenario` and each
    serving run's `RunLoad` share these fields; an offline run sent through a server uses the defaults."""

    arrivals: Literal["poisson", "gamma", "constant"] = "poisson"
    """Gaps between requests at a rate: Poisson (random), gamma (with a burstiness), or constant (1 / rate each)."""
    burstiness: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    """Gamma arrivals' shape: below 1 burstier than Poisson, above 1 more even."""
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0
    requests: Annotated[int, Field(ge=1)] | None = None
    """Measured requests (default 64; with duration_s alone, as many as the rate sends in that time)."""
    duration_s: Annotated[float, Field(gt=0)] | None = None
    warmup_requests: Annotated[int, Field(ge=0)] = 1
    input: Literal["prompts", "synthetic", "shared_prefix", "sharegpt", "sessions", "trace"] = "prompts"
    """What the requests hold: the experiment's prompt file, cycled, or the section of that name."""
    synthetic: SyntheticSpec | None = None
    shared_prefix: SharedPrefixSpec | None = None
    sharegpt: ShareGPTSpec | None = None
    sessions: SessionsSpec | None = None
    trace: TraceSpec | None = None
    api: Literal["completions", "chat"] = "completions"
    """The OpenAI API the requests go to: /v1/completions, or /v1/chat/completions with each prompt as the user's
    message (the server applies its chat template; token-id prompts written as texts of their length)."""
    ignore_eos: bool = False
    """Every request generates its full length (max_new_tokens, or the synthetic output length)."""
    slo: SLOSpec = SLOSpec()
    timeout_s: Annotated[float, Field(gt=0)] = 600.0
    """A request without an answer after this long counts as an error."""
    max_batch: Annotated[int, Field(ge=1)] = 32
    """distinfer's server: requests decoded together at most (more wait to join)."""
    client: ClientSpec = ClientSpec()
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
            set_fields = {"rate", "concurrency", "requests", "duration_s", "slo", *INPUTS[1:]} & self.model_fields_set
            if set_fields:
                raise ValueError(f"{', '.join(sorted(set_fields))} belong to a serving scenario; set kind: serving")
            return self
        if self.input == "trace":
            if self.rate is not None or self.concurrency is not None:
                raise ValueError("a trace is replayed on its own times: no rate or concurrency (trace.time_scale "
                                 "speeds it up or slows it down)")
        elif (self.rate is None) == (self.concurrency is None):
            raise ValueError("a serving scenario needs exactly one of rate (open loop) or concurrency (closed loop)")
        if self.arrivals != "gamma" and "burstiness" in self.model_fields_set and self.burstiness != 1.0:
            raise ValueError(f"burstiness needs arrivals: gamma ({self.arrivals} arrivals have none to set)")
        if self.input == "sessions" and (self.client.processes not in (1, "auto") or self.client.nodes > 1):
            raise ValueError("client: a session's turns follow each other in one process; multi-turn sessions run "
                             "in one (client.processes: 1, client.nodes: 1)")
        if self.api == "chat" and self.input == "trace":
            raise ValueError("api: chat sends text messages; a trace's prompts are token ids (its shared blocks "
                             "exact): use api: completions")
        for name in INPUTS[1:]:
            if (self.input == name) != (getattr(self, name) is not None):
                raise ValueError(f"input: {name} goes with a `{name}` section, and a `{name}` section with "
                                 f"input: {name} (input is {self.input})")
        return self

    def loads(self) -> list[tuple[str, float | int]]:
        """The sweep: ("rate", r) per rate (inf as math.inf), ("concurrency", c) per user count, or ("trace", s) per
        time scale of a trace."""
        if self.trace is not None:
            scales = self.trace.time_scale
            return [("trace", float(s)) for s in (scales if isinstance(scales, list) else [scales])]
        if self.rate is not None:
            rates = self.rate if isinstance(self.rate, list) else [self.rate]
            return [("rate", math.inf if r == "inf" else float(r)) for r in rates]
        users = self.concurrency if isinstance(self.concurrency, list) else [self.concurrency]
        return [("concurrency", int(c)) for c in users or []]


class RunLoad(LoadSettings):
    """A serving run's load: the experiment's scenario with this run's rate or user count (run.json's
    `scenario`), and its SLOs in seconds."""

    @property
    def gap_shape(self) -> float:
        """The gamma shape of the gaps between arrivals (schedule.arrival_offsets): the burstiness, 1 for Poisson,
        inf for constant gaps."""
        return math.inf if self.arrivals == "constant" else self.burstiness

    kind: Literal["serving"] = "serving"
    load: Literal["rate", "concurrency", "trace"]
    value: float | int | Literal["inf"]
    """The rate in requests/s ('inf': every request at once), the number of users, or a trace's time scale."""
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
    """rate4, rate0.5, rateinf, c8, trace1, trace0.5: a run id's load part."""
    if kind == "concurrency":
        return f"c{int(value)}"
    if kind == "trace":
        return f"trace{value:g}"
    return "rateinf" if math.isinf(value) else f"rate{value:g}"
