"""What a client may send to `POST /v1/completions`, checked before anything reaches the engine.

Every field has its range here: a value outside it is an HTTP 400 naming the field and what is allowed, so that
nothing a client sends can raise inside the engine thread (a seed beyond 64 bits once stopped a multi-rank
server). Fields of the OpenAI API that distinfer does not implement are accepted at their neutral value
(`logprobs: null`, `echo: false`, ...) and refused otherwise; a field that no API defines is refused by name.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distinfer.runtime.sampling import SEED_MAX, SEED_MIN, SamplingParams

GREEDY_BELOW = 1e-5  # temperatures under this decode greedily (as vLLM does): dividing by them overflows
MAX_TOKENS_LIMIT = 2**31 - 1
# OpenAI (and vLLM) fields the server does not implement, with the values that mean "not used".
NEUTRAL = {"echo": (False, None), "logprobs": (None, 0, False), "best_of": (None, 1), "suffix": (None, ""),
           "logit_bias": (None, {}), "stop": (None, [], ""), "stop_token_ids": (None, []),
           "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0),
           "repetition_penalty": (None, 1, 1.0), "min_tokens": (None, 0), "min_p": (None, 0, 0.0),
           "return_token_ids": (None, True, False), "skip_special_tokens": (None, True), "user": None}


class RequestError(ValueError):
    """A request the server refuses (HTTP 400), with a message for the client."""


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str
    prompt: str | list[int]
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    """The OpenAI API's newer name for max_tokens; either may be given, not both with different values."""
    stream: bool = False
    temperature: float = Field(1.0, ge=0, le=1e6)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, le=2**31 - 1)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    ignore_eos: bool = False
    n: int = Field(1, ge=1, le=2**31 - 1)
    stream_options: dict[str, bool] | None = None

    @model_validator(mode="after")
    def _one_length(self) -> CompletionRequest:
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ; give one of them")
        return self

    @property
    def new_tokens(self) -> int:
        return self.max_tokens or self.max_completion_tokens or 16

    def sampling(self, default_seed: int) -> SamplingParams:
        """The engine's sampling parameters; greedy for temperature 0 (or below GREEDY_BELOW)."""
        greedy = self.temperature < GREEDY_BELOW
        return SamplingParams(greedy=greedy, temperature=1.0 if greedy else self.temperature,
                              top_k=max(0, self.top_k), top_p=self.top_p,
                              seed=self.seed if self.seed is not None else default_seed)


def parse_request(body: object) -> CompletionRequest:
    """The checked request, or RequestError with one line naming the field and what is allowed."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        request = CompletionRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        raise RequestError(f"field '{field}': {first['msg']}") from None
    unknown = sorted(name for name in request.model_extra or {} if name not in NEUTRAL)
    if unknown:
        known = sorted([*CompletionRequest.model_fields, *NEUTRAL])
        raise RequestError(f"unknown field(s) {', '.join(map(repr, unknown))}; this server takes {', '.join(known)}")
    unsupported = sorted(name for name, value in (request.model_extra or {}).items()
                         if NEUTRAL[name] is not None and not _neutral(value, NEUTRAL[name]))
    unsupported += ["n > 1"] if request.n != 1 else []
    if unsupported:
        raise RequestError(f"not supported by distinfer's server: {', '.join(unsupported)} (only at its neutral value)")
    return request


def _neutral(value: object, allowed: tuple) -> bool:
    return any(type(value) is type(ok) and value == ok or (value is None and ok is None) for ok in allowed)
