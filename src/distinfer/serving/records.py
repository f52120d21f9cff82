"""One request's record: what the load generator saw, written to requests.jsonl as the request finishes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestRecord:
    """Times are seconds since the load generator's start (time.perf_counter based)."""

    index: int
    prompt_id: str
    planned_s: float  # when the schedule said to send it
    sent_s: float | None = None  # when it was sent
    token_times_s: list[float] = field(default_factory=list)  # each streamed token's arrival
    end_s: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int = 0
    finish_reason: str | None = None
    status: int | None = None  # HTTP status
    error: str | None = None
    warmup: bool = False
    text: str = ""
    token_ids: list[int] | None = None  # where the server streams them (distinfer's does)
    planned_input_tokens: int | None = None  # the workload's prompt length, where it knows it
    planned_output_tokens: int | None = None  # max_tokens asked
    group: int | None = None  # a shared-prefix workload's group
    session: int | None = None  # a multi-turn session's index, and this request's turn in it (from 0)
    turn: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200 and self.output_tokens > 0

    def to_dict(self) -> dict:
        """The fields as they are (a shallow copy: dataclasses.asdict deep-copies every token time, which cost
        more than streaming the tokens did; a finished record is not changed again)."""
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict) -> RequestRecord:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
