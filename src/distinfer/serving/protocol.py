"""What a client may send to `POST /v1/completions` and `POST /v1/chat/completions`, checked before anything reaches
the engine.

Every field has its range here: a value outside it is an HTTP 400 naming the field and what is allowed, so that
nothing a client sends can raise inside the engine thread (a seed beyond 64 bits once stopped a multi-rank
server). Fields of the OpenAI API that distinfer does not implement are accepted at their neutral value
(`logprobs: null`, `echo: false`, `tools: []`, ...) and refused otherwise; a field that no API defines is refused
by name.
"""

from __future__ import annotations

from typing import Literal

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
# ... and those of the chat API alone.
CHAT_NEUTRAL = {**NEUTRAL, "top_logprobs": (None, 0), "tools": (None, []), "tool_choice": (None, "none", "auto"),
                "parallel_tool_calls": (None, True, False), "response_format": (None, {"type": "text"}),
                "functions": (None, []), "function_call": (None, "none", "auto"), "metadata": None,
                "store": (None, False), "service_tier": None, "add_generation_prompt": (None, True),
                "continue_final_message": (None, False), "chat_template_kwargs": (None, {})}
MAX_MESSAGES = 10_000


class RequestError(ValueError):
    """A request the server refuses (HTTP 400), with a message for the client."""


class SamplingRequest(BaseModel):
    """The fields both APIs share: the model, the answer's length, streaming and sampling."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str
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
    def _one_length(self) -> SamplingRequest:
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


class CompletionRequest(SamplingRequest):
    prompt: str | list[int]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message; `content` as a string or as text parts (the newer form), joined."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)


def parse_request(body: object, kind: type[SamplingRequest] = CompletionRequest) -> SamplingRequest:
    """The checked request (`CompletionRequest` or `ChatRequest`), or RequestError with one line naming the field
    and what is allowed."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        request = kind.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        raise RequestError(f"field '{field}': {first['msg']}") from None
    neutral = CHAT_NEUTRAL if kind is ChatRequest else NEUTRAL
    unknown = sorted(name for name in request.model_extra or {} if name not in neutral)
    if unknown:
        known = sorted([*kind.model_fields, *neutral])
        raise RequestError(f"unknown field(s) {', '.join(map(repr, unknown))}; this server takes {', '.join(known)}")
    unsupported = sorted(name for name, value in (request.model_extra or {}).items()
                         if neutral[name] is not None and not _neutral(value, neutral[name]))
    unsupported += ["n > 1"] if request.n != 1 else []
    if unsupported:
        raise RequestError(f"not supported by distinfer's server: {', '.join(unsupported)} (only at its neutral value)")
    return request


def _neutral(value: object, allowed: tuple) -> bool:
    return any(type(value) is type(ok) and value == ok or (value is None and ok is None) for ok in allowed)
