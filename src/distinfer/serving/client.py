"""The load generator: OpenAI completions or chat completions requests with `stream: true`, sent on a schedule or by
a fixed number of users, every streamed chunk's arrival recorded.

Open loop: request i is sent at its planned offset (schedule.py) whatever the server does; closed loop: N
users each send their next request when the last one ended. Warm-up requests go first, one after another,
and are marked. Each finished request's record goes to `on_record` at once (the bundle appends it to
requests.jsonl), so a run that is killed keeps what it had. The API key travels in the Authorization header
only; it is never part of a record.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import aiohttp

from distinfer.serving.records import RequestRecord
from distinfer.serving.schedule import planned_offsets

MAX_EVENT_BYTES = 1 << 20  # one server-sent event line; aiohttp's own line reader stops at 64 KiB


@dataclass(frozen=True)
class Request:
    """One request to send: a text prompt, a prompt of token ids (synthetic workloads), or a conversation's
    messages (multi-turn sessions through the chat API)."""

    index: int
    prompt_id: str
    prompt: str | list[int] | list[dict[str, str]]
    max_tokens: int
    ignore_eos: bool = False
    warmup: bool = False
    input_tokens: int | None = None  # planned prompt tokens, where the workload knows them
    group: int | None = None  # the shared-prefix group
    at_s: float | None = None  # a replayed trace's send time, seconds after the load's start


@dataclass(frozen=True)
class Target:
    """An OpenAI-compatible server: its base URL (`http://host:port`), the model name it serves, a key."""

    url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 600.0
    extra_body: dict = field(default_factory=dict)  # e.g. sampling settings
    api: str = "completions"  # or "chat": /v1/chat/completions, the prompt as the user's message


def completions_url(url: str, api: str = "completions") -> str:
    base = url.rstrip("/")
    for tail in ("/v1/completions", "/v1/chat/completions"):
        base = base.removesuffix(tail)
    path = "/chat/completions" if api == "chat" else "/completions"
    return (base if base.endswith("/v1") else base + "/v1") + path


def request_body(target: Target, request: Request) -> dict:
    if target.api == "chat":
        if isinstance(request.prompt, str):
            messages = [{"role": "user", "content": request.prompt}]
        elif request.prompt and all(isinstance(m, dict) for m in request.prompt):
            messages = request.prompt  # a session's history
        else:
            raise ValueError("the chat API takes text prompts, not token ids")
        body = {"model": target.model, "messages": messages, "max_completion_tokens": request.max_tokens}
    else:
        body = {"model": target.model, "prompt": request.prompt, "max_tokens": request.max_tokens}
    body.update({"stream": True, "temperature": 0.0, "stream_options": {"include_usage": True}, **target.extra_body})
    if request.ignore_eos:
        body["ignore_eos"] = True  # vLLM's and distinfer's extension: generate max_tokens whatever comes
    return body


async def send(session: aiohttp.ClientSession, target: Target, request: Request, record: RequestRecord,
               clock: Callable[[], float]) -> RequestRecord:
    """POST one streamed completion; fills `record` with the send time, each chunk's time, the end, counts,
    finish reason, HTTP status or the error."""
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    times, parts, token_ids = record.token_times_s, [record.text], record.token_ids  # appended in place per chunk
    loads = json.loads
    record.sent_s = clock()
    counted = 0
    try:
        async with session.post(completions_url(target.url, target.api), json=request_body(target, request),
                                headers=headers) as response:
            record.status = response.status
            if response.status != 200:
                record.error = f"HTTP {response.status}: {(await response.text())[:300]}"
                return record
            pending, ended = b"", False
            # whatever bytes have arrived, split into lines here: one event-loop step per read, not per line
            async for block in response.content.iter_any():
                now = clock()  # every event of this read arrived by now
                *lines, pending = (pending + block).split(b"\n")
                if len(pending) > MAX_EVENT_BYTES:  # a stream without line ends would grow without bound
                    raise ValueError(f"an event line longer than {MAX_EVENT_BYTES} bytes")
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        ended = True
                        break
                    chunk = loads(data)
                    if "error" in chunk and chunk["error"]:
                        record.error = str(chunk["error"])[:300]
                        ended = True
                        break
                    usage = chunk.get("usage")
                    if usage:
                        record.prompt_tokens = usage.get("prompt_tokens")
                        record.output_tokens = int(usage.get("completion_tokens") or counted)
                    for choice in chunk.get("choices") or ():
                        text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                        ids = choice.get("token_ids")
                        if ids:  # a chunk of several tokens: each arrived now
                            times.extend([now] * len(ids))
                            counted += len(ids)
                            if token_ids is None:
                                token_ids = []
                            token_ids.extend(ids)
                        elif text:
                            times.append(now)
                            counted += 1
                        if text:
                            parts.append(text)
                        if choice.get("finish_reason"):
                            record.finish_reason = choice["finish_reason"]
                if ended:
                    break
    except asyncio.TimeoutError:
        record.error = f"no answer within {target.timeout_s:g} s"
    except aiohttp.ClientError as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:300]
    except (ValueError, AttributeError, TypeError) as exc:  # an event that is not the API's JSON
        record.error = f"the server streamed an event that is not a completion chunk: {exc}"[:300]
    finally:
        record.end_s = clock()
        record.text, record.token_ids = "".join(parts), token_ids
    if record.error is None:
        record.output_tokens = record.output_tokens or counted
    return record


T = TypeVar("T")
SPIN_S = 0.002  # the last stretch before a send is waited out by yielding, not by a timer (epoll rounds to 1 ms)
IDLE_TURN_S = 50e-6  # a yield that comes back this soon found nothing else to do: the loop was idle, not busy


class Spin:
    """Wall time the load generator spent yielding with nothing else to do while it waited for a send time: CPU
    burnt for timing, not work. A client's CPU share leaves it out (its busy share is what saturates)."""

    idle_s = 0.0


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while the load runs (what exists before it frozen out of later
    collections), on again after: a full collection stops the event loop for tens of milliseconds, and every
    request scheduled meanwhile would leave late. The load's objects are freed by reference counting; what
    cycles leave waits for the collection at the end."""
    enabled = gc.isenabled()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.unfreeze()


def busy_share(cpu: float, wall: float, spin: float) -> float:
    """This process's busy CPU share since time.process_time() was `cpu`, time.monotonic() `wall` and Spin.idle_s
    `spin`: its CPU time less the idle spinning, over the wall time."""
    busy = (time.process_time() - cpu) - (Spin.idle_s - spin)
    return max(0.0, busy) / max(time.monotonic() - wall, 1e-9)


async def until(moment: float, clock: Callable[[], float]) -> None:
    """Return at `moment` on `clock`: a timer sleep to SPIN_S before it, then yielding to the loop's other work
    (streamed chunks keep being read) until it has come."""
    delay = moment - clock() - SPIN_S
    if delay > 0:
        await asyncio.sleep(delay)
    now = clock()
    while now < moment:
        await asyncio.sleep(0)
        turn, now = clock() - now, clock()
        if turn < IDLE_TURN_S:
            Spin.idle_s += turn


async def schedule(items: Sequence[T], start: Callable[[T, float], Awaitable[None]], clock: Callable[[], float],
                   rate: float | None = None, burstiness: float = 1.0, seed: int = 0, concurrency: int | None = None,
                   duration_s: float | None = None, times: Sequence[float] | None = None,
                   base: float | None = None) -> None:
    """Start every item (a request, a session) and wait for all: open loop at `rate` (schedule.py) or at the
    items' own `times` (neither rate nor users), or closed loop, `concurrency` users each starting the next when
    theirs ended; none after `duration_s`. Offsets count from `base` on `clock` (default: now). `start(item,
    planned)` runs one item to its end, `planned` being when the schedule meant it to start."""
    base = clock() if base is None else base
    await until(base, clock)
    if concurrency is None:
        offsets = planned_offsets(list(times or ()) if rate is None else [None] * len(items), rate, burstiness, seed)
        tasks = []
        for item, offset in zip(items, offsets, strict=True):
            if duration_s is not None and offset > duration_s:
                break
            await until(base + offset, clock)
            tasks.append(asyncio.create_task(start(item, base + offset)))
        await asyncio.gather(*tasks)
        return
    queue = list(reversed(items))

    async def user() -> None:
        while queue and (duration_s is None or clock() - base < duration_s):
            await start(queue.pop(), clock())

    await asyncio.gather(*(user() for _ in range(min(concurrency, max(1, len(items))))))


def perf_clock(zero: float | None = None) -> Callable[[], float]:
    """Seconds since `zero` on time.perf_counter (default: this call): the load's clock. perf_counter is
    CLOCK_MONOTONIC, one clock for every process of the host."""
    start = time.perf_counter() if zero is None else zero
    return lambda: time.perf_counter() - start


async def run_load(target: Target, requests: Sequence[Request], on_record: Callable[[RequestRecord], None],
                   rate: float | None = None, burstiness: float = 1.0, seed: int = 0,
                   concurrency: int | None = None, duration_s: float | None = None,
                   clock: Callable[[], float] | None = None, base: float | None = None) -> list[RequestRecord]:
    """Send the warm-up requests one by one, then the measured ones open loop (`rate`, requests/s; inf: all at
    once), on their own schedule (neither rate nor users: each request's `at_s`, a replayed trace) or closed
    loop (`concurrency` users), no new one after `duration_s`; returns every record (warm-up first). Times are
    on `clock` (default: seconds from now), the schedule's offsets from `base` on it (default: once the warm-up
    requests are done)."""
    warmup = [r for r in requests if r.warmup]
    measured = [r for r in requests if not r.warmup]
    times = [r.at_s for r in measured] if rate is None and concurrency is None else None
    if rate is not None and concurrency is not None or times is not None and None in times:
        raise ValueError("give exactly one of rate (open loop) or concurrency (closed loop), or requests with "
                         "their send times")
    clock = clock or perf_clock()
    timeout = aiohttp.ClientTimeout(total=target.timeout_s)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    records: list[RequestRecord] = []

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        async def one(request: Request, planned: float) -> None:
            record = RequestRecord(request.index, request.prompt_id, planned, warmup=request.warmup,
                                   planned_input_tokens=request.input_tokens,  # the chat template's, for chat
                                   planned_output_tokens=request.max_tokens, group=request.group)
            await send(session, target, request, record, clock)
            records.append(record)
            on_record(record)

        for request in warmup:
            await one(request, clock())
        with collector_paused():
            await schedule(measured, one, clock, rate, burstiness, seed, concurrency, duration_s, times, base)
    return sorted(records, key=lambda r: (not r.warmup, r.index))
