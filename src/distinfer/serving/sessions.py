"""Multi-turn sessions: conversations whose history grows, each turn waiting for the answer before it.

A session takes a conversation of a ShareGPT file (sharegpt.py) and asks its questions in order. Each turn's
prompt holds the whole history: the earlier questions and the answers the server actually gave (not the file's),
as the chat API's `messages`, or, for the completions API, rendered with the plain template (template.py).
After an answer the session thinks for `think_time_s` before its next question. Sessions start open loop at the
scenario's rate (the schedule of schedule.py) or keep `concurrency` of them busy (closed loop); a failed turn
ends its session. Each turn's record names its session and turn, for TTFT by turn.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from distinfer.scenario import RunLoad
from distinfer.serving.client import Request, Target, collector_paused, perf_clock, schedule, send
from distinfer.serving.lengths import draw_length
from distinfer.serving.records import RequestRecord
from distinfer.serving.sharegpt import read_conversations
from distinfer.serving.template import plain_template
from distinfer.tokencount import token_counter

MAX_TURNS = 1000  # a whole session's requests share one index range of this size


@dataclass(frozen=True)
class Session:
    index: int
    id: str
    questions: tuple[str, ...]
    max_tokens: tuple[int, ...]
    think_s: float = 0.0
    warmup: bool = False


def build_sessions(load: RunLoad, model_path: str, total: int) -> list[Session]:
    """`total` sessions (the warm-up ones first), drawn from the file's conversations by the scenario's seed."""
    spec = load.sessions
    assert spec is not None
    conversations = [c for c in read_conversations(Path(spec.file)) if c.exchanges]
    if not conversations:
        raise ValueError(f"{spec.file}: no conversation with a question and its answer")
    rng = random.Random(load.seed)
    counter = token_counter(model_path, special_tokens=False) if spec.output_tokens is None else None
    if spec.output_tokens is None and counter is None:
        raise ValueError("sessions take each answer's length from the file's answers, counted with the model's "
                         f"tokenizer files; none readable in {model_path or '(no model path)'}: set "
                         "scenario.sessions.output_tokens")
    order = list(range(len(conversations)))
    rng.shuffle(order)
    sessions = []
    for index in range(total):
        conversation = conversations[order[index % len(order)]]
        turns = min(draw_length(spec.turns, rng), len(conversation.exchanges), MAX_TURNS)
        exchanges = conversation.exchanges[:turns]
        if spec.output_tokens is not None:
            lengths = tuple(draw_length(spec.output_tokens, rng) for _ in exchanges)
        else:
            lengths = tuple(max(1, n) for n in counter([answer for _, answer in exchanges]))
        sessions.append(Session(index, conversation.id, tuple(q for q, _ in exchanges), lengths, spec.think_time_s,
                                warmup=index < load.warmup_requests))
    return sessions


async def converse(http: aiohttp.ClientSession, target: Target, session: Session, ignore_eos: bool,
                   clock: Callable[[], float], on_record: Callable[[RequestRecord], None], planned: float) -> None:
    """Ask the session's questions in order, each with the history so far."""
    history: list[dict[str, str]] = []
    for turn, (question, max_tokens) in enumerate(zip(session.questions, session.max_tokens, strict=True)):
        if turn:
            await asyncio.sleep(session.think_s)
            planned = clock()
        history.append({"role": "user", "content": question})
        prompt = list(history) if target.api == "chat" else plain_template(history)
        request = Request(session.index * MAX_TURNS + turn, f"{session.id}-t{turn}", prompt, max_tokens, ignore_eos,
                          warmup=session.warmup)
        record = RequestRecord(request.index, request.prompt_id, planned, warmup=session.warmup,
                               planned_output_tokens=max_tokens, session=session.index, turn=turn)
        await send(http, target, request, record, clock)
        on_record(record)
        if not record.ok:
            return
        history.append({"role": "assistant", "content": record.text})


async def run_sessions(target: Target, sessions: Sequence[Session], on_record: Callable[[RequestRecord], None],
                       ignore_eos: bool = False, rate: float | None = None, burstiness: float = 1.0, seed: int = 0,
                       concurrency: int | None = None, duration_s: float | None = None) -> None:
    """The warm-up sessions one by one, then the measured ones starting at `rate` sessions/s (open loop) or
    `concurrency` at a time (closed loop), no new one after `duration_s` (client.schedule)."""
    if (rate is None) == (concurrency is None):
        raise ValueError("give exactly one of rate (open loop) or concurrency (closed loop)")
    clock = perf_clock()
    timeout = aiohttp.ClientTimeout(total=target.timeout_s)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
        async def one(session: Session, planned: float) -> None:
            await converse(http, target, session, ignore_eos, clock, on_record, planned)

        for session in (s for s in sessions if s.warmup):
            await one(session, clock())
        with collector_paused():
            await schedule([s for s in sessions if not s.warmup], one, clock, rate, burstiness, seed, concurrency,
                           duration_s)
