"""Continuous batching over one or more pipeline stages: requests join the running decode at the next step and
leave when done, and with P stages at least P groups of requests are in flight so that the stages work at once.

The scheduler runs on stage 0 beside the HTTP server. Requests are spread over groups (micro-batches: the
run's `microbatches`, at least one per stage). A group's step (serving/stages.py) drops the rows that ended,
decodes one token for every running row, and prefills the requests that join it; the step goes through the
stages (serving/pipeline.py) and the last stage's sampled tokens come back to the scheduler, which hands each
to its request and decides who goes on (EOS unless `ignore_eos`, its `max_tokens`, or a cancelled client).
While one group's step is in the pipeline the scheduler starts the others', so with P stages and P groups
every stage has work. A group waits for its own step's tokens before its next step, as generation must.

One thread (`run_forever`) owns stage 0; `submit` and `cancel` may be called from any thread, and tokens are
handed to each request's `emit` callback from the engine thread.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from distinfer.runtime.sampling import SamplingParams
from distinfer.serving.pipeline import HEARTBEAT, StageLink, TensorPeers, run_first_stage
from distinfer.serving.stages import Prefill, StageState, Step

Emit = Callable[[int | None, str | None], None]  # (token id or None, finish reason or None)
HEARTBEAT_S = 30.0  # an idle multi-stage server tells its stages it is alive this often
log = logging.getLogger(__name__)


@dataclass
class Sequence:
    """One request in the engine."""

    request_id: int
    prompt_ids: list[int]
    max_tokens: int
    emit: Emit
    ignore_eos: bool = False
    sampling: SamplingParams = field(default_factory=SamplingParams)
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    arrived: float = field(default_factory=time.perf_counter)


@dataclass
class EngineStats:
    """What /metrics reports."""

    requests_total: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    generated_tokens_total: int = 0
    prompt_tokens_total: int = 0
    steps_total: int = 0
    running: int = 0
    waiting: int = 0
    groups_in_flight_max: int = 0


@dataclass
class _Group:
    index: int
    running: list[Sequence] = field(default_factory=list)  # rows in order, as every stage holds them
    in_flight: Step | None = None
    joining: list[Sequence] = field(default_factory=list)  # the in-flight step's prefills
    tokens: list[int] | None = None  # a one-stage step's sampled tokens, until `_finish_step` takes them


class ServingEngine:
    """The scheduler on stage 0. `link` is None for a one-stage layout; `peers`, where given, are the other
    ranks of a tensor-parallel layout, which apply every step to their shards."""

    def __init__(self, stage: StageState, link: StageLink | None, eos_token_ids: tuple[int, ...],
                 max_batch: int = 32, max_positions: int | None = None, peers: TensorPeers | None = None) -> None:
        self.stage, self.link, self.peers, self.eos = stage, link, peers, set(eos_token_ids)
        self._others = link or peers  # who hears of each step (None: no other rank)
        self.max_batch, self.max_positions = max_batch, max_positions
        self.stats = EngineStats()
        self.failure: BaseException | None = None  # what stopped the engine thread, if anything did
        self._groups = [_Group(i) for i in range(len(stage.groups))]
        self._per_group = max(1, math.ceil(max_batch / len(self._groups)))
        self._ids = itertools.count()
        self._waiting: list[Sequence] = []
        self._flight: collections.deque[_Group] = collections.deque()
        self._wake = threading.Condition()
        self._stopped = False

    # -- called from any thread -------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], max_tokens: int, emit: Emit, ignore_eos: bool = False,
               sampling: SamplingParams | None = None) -> int:
        """Queue a request; its tokens go to `emit(token, None)`, and its end to `emit(None, reason)`."""
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        if self.max_positions is not None and len(prompt_ids) + max_tokens > self.max_positions:
            raise ValueError(f"{len(prompt_ids)} prompt tokens + max_tokens {max_tokens} exceed the model's "
                             f"{self.max_positions} positions")
        sampling = sampling or SamplingParams()
        if not sampling.greedy and not (0 < sampling.temperature < math.inf and 0 < sampling.top_p <= 1
                                        and sampling.top_k >= 0):
            raise ValueError(f"sampling out of range: {sampling}")
        if self.failure is not None:
            raise RuntimeError(f"the engine stopped: {self.failure}")
        sequence = Sequence(next(self._ids), list(prompt_ids), max_tokens, emit, ignore_eos, sampling)
        with self._wake:
            self._waiting.append(sequence)
            self.stats.requests_total += 1
            self.stats.prompt_tokens_total += len(prompt_ids)
            self.stats.waiting = len(self._waiting)
            self._wake.notify()
        return sequence.request_id

    def cancel(self, request_id: int) -> None:
        """Free a request's slot at its group's next step (its client went away)."""
        with self._wake:
            for sequence in self._requests():
                if sequence.request_id == request_id:
                    sequence.cancelled = True
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()

    # -- the engine thread ------------------------------------------------------------------------------
    def run_forever(self) -> None:
        """Steps until `stop`; then tells the other stages to stop. An error (a stage gone) is kept in
        `failure`, and every waiting or running request ends with finish reason 'error'."""
        try:
            with torch.inference_mode():
                self._loop()
        except BaseException as exc:  # noqa: BLE001 - reported to every request and to the server
            self.failure = exc
            log.exception("the serving engine stopped")
            for sequence in self._requests():
                if not sequence.done:
                    sequence.done = True
                    sequence.emit(None, "error")
            return
        if self._others is not None:
            try:
                self._tell(None)
                self._others.drain()
            except RuntimeError as exc:  # a stage already gone (its launcher stopped it): nothing to tell
                log.warning("could not tell the stages to stop: %s", exc)

    def _loop(self) -> None:
        while True:
            with self._wake:
                idle_since = time.monotonic()
                while not self._stopped and not self._flight and not self._has_work():
                    self._wake.wait(timeout=HEARTBEAT_S)
                    if self._others is not None and time.monotonic() - idle_since >= HEARTBEAT_S:
                        self._tell(HEARTBEAT)
                        idle_since = time.monotonic()
                if self._stopped:
                    break
                steps = [(group, self._next_step(group)) for group in self._groups if group.in_flight is None]
                self.stats.waiting = len(self._waiting)
                self.stats.running = sum(len(g.running) + len(g.joining) for g in self._groups)
            for group, step in steps:
                if step is not None:
                    self._start(group, step)
            if self._flight:
                self._finish_step(self._flight.popleft())
        while self._flight:  # the steps under way come back before the stages are told to stop
            self._finish_step(self._flight.popleft())

    def _requests(self) -> list[Sequence]:
        """Every request the engine holds: waiting, running, or joining a group's step."""
        return self._waiting + [s for g in self._groups for s in g.running + g.joining]

    def _has_work(self) -> bool:
        return bool(self._waiting) or any(g.running or g.joining for g in self._groups)

    def _next_step(self, group: _Group) -> Step | None:
        """The group's next step: drop the ended rows, decode the rest, take waiting requests up to the group's
        share (the requests spread evenly over the groups, at most max_batch in all). Called under the lock."""
        for sequence in group.running:
            if sequence.cancelled and not sequence.done:
                self._end(sequence, "cancelled")
        kept = [row for row, sequence in enumerate(group.running) if not sequence.done]
        keep = None if len(kept) == len(group.running) else kept
        group.running = [group.running[row] for row in kept]
        active = sum(len(g.running) + len(g.joining) for g in self._groups) + len(self._waiting)
        share = min(self._per_group, math.ceil(active / len(self._groups)))
        joining = []
        while self._waiting and len(group.running) + len(joining) < share:
            sequence = self._waiting.pop(0)
            if sequence.cancelled:
                self._end(sequence, "cancelled")
            else:
                joining.append(sequence)
        if not group.running and not joining and keep is None:
            return None
        group.joining = joining
        return Step(group.index, keep, decode=bool(group.running),
                    tokens=[s.generated[-1] for s in group.running],
                    prefills=[Prefill(s.request_id, s.prompt_ids, s.sampling) for s in joining])

    def _tell(self, step: Step | None) -> None:
        """The other ranks learn of a step, a heartbeat or the stop (None)."""
        if self.link is not None:
            self.link.send_step(step, 1)
        elif self.peers is not None:
            self.peers.send_step(step)

    def _start(self, group: _Group, step: Step) -> None:
        if self.peers is not None:
            self.peers.send_step(step)
        tokens = run_first_stage(self.stage, self.link, step)
        self.stats.steps_total += 1
        if step.results == 0:  # only dropped rows: nothing comes back
            return
        group.in_flight, group.tokens = step, tokens
        self._flight.append(group)
        self.stats.groups_in_flight_max = max(self.stats.groups_in_flight_max, len(self._flight))

    def _finish_step(self, group: _Group) -> None:
        step, tokens = group.in_flight, group.tokens
        if tokens is None:
            tokens = self.link.recv((step.results,), torch.long, self.link.world_size - 1).tolist()
        with self._wake:
            rows = (group.running if step.decode else []) + group.joining  # the order the last stage sampled in
            group.running += group.joining
            group.joining, group.in_flight, group.tokens = [], None, None
            for sequence, token in zip(rows, tokens, strict=True):
                self._after_token(sequence, token)

    def _after_token(self, sequence: Sequence, token: int) -> None:
        """Hand the token out and mark the request done when it ends."""
        if sequence.done:
            return
        if sequence.cancelled:
            self._end(sequence, "cancelled")
            return
        sequence.generated.append(token)
        self.stats.generated_tokens_total += 1
        sequence.emit(token, None)
        if token in self.eos and not sequence.ignore_eos:
            self._end(sequence, "stop")
        elif len(sequence.generated) >= sequence.max_tokens:
            self._end(sequence, "length")

    def _end(self, sequence: Sequence, reason: str) -> None:
        sequence.done = True
        if reason == "cancelled":
            self.stats.requests_cancelled += 1
        else:
            self.stats.requests_finished += 1
        sequence.emit(None, reason)
