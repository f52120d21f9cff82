"""Serving runs predicted: distinfer's server (serving/engine.py) simulated step by step on the request schedule
the client will send, from the same stage costs as offline batches.

The simulation does what the engine does. Requests arrive at the seeded schedule's times (serving/schedule.py:
open loop at a rate, all at once, or closed-loop users who send the next request when the last one ends). The
scheduler on stage 0 starts a step for every group not in flight: the group drops its ended rows, decodes one
token for the rows left and prefills the waiting requests up to its share (the requests spread evenly over the
groups, at most max_batch in all), padded to the longest prompt. Stage 0 runs its part of the step, then the
later stages in turn as they come free (stages that share CPU cores wait for each other), and the sampled
tokens come back to stage 0, which hands them out one by one. Beyond the forwards the server pays a fixed time a
step (scheduling, its caches' joins), a time per token handed out (the HTTP stream, detokenizing, on the same
machine the client that reads the stream) and a time per request it takes in (parsing, tokenizing), all on
stage 0 in turn with its forwards (on a CPU the server's threads share the cores; on a GPU they hold the
interpreter's lock); calibration fits the three on served runs of one rank. TTFT, TPOT and output tokens/s come
out as the client measures them (serving/metrics.py). Every request generates its max_tokens (no early EOS). The
server runs transformers' own forward (stock CPU kernels), which the prediction assumes too.
"""

from __future__ import annotations

import collections
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

from distinfer.memory import ModelFacts
from distinfer.predict.model import Efficiency, Machine, Prediction, StageCosts, predict_run
from distinfer.serving.metrics import summarize
from distinfer.serving.records import RequestRecord
from distinfer.serving.schedule import arrival_offsets
from distinfer.serving.serve import groups_of
from distinfer.serving.workload import ModelShape, build_requests, request_count

MAX_SIMULATED = 2000  # requests a prediction simulates (a duration-bound load: the first ones)


@dataclass
class _Request:
    prompt: int
    tokens: int  # max_tokens: every request generates them all
    arrival: float = math.inf  # when it is sent (closed loop: when its user's last request ended)
    user: int | None = None
    times: list[float] = field(default_factory=list)  # when each token was handed out

    @property
    def done(self) -> bool:
        return len(self.times) >= self.tokens


@dataclass
class _Group:
    running: list[_Request] = field(default_factory=list)
    back: float | None = None  # when its step in flight is back at stage 0
    rows: list[_Request] = field(default_factory=list)  # the step's rows, in sampling order


def workload(run, prompt_tokens: list[int], vocab: int) -> list[_Request]:  # noqa: ANN001 - a plan.RunSpec
    """The measured requests the client sends, in order, with their prompt lengths and max_tokens."""
    load = run.scenario
    n = run.generation.max_new_tokens
    count = min(request_count(load), MAX_SIMULATED)
    if load.input in ("sessions", "trace"):  # predict/study.py leaves these out
        raise ValueError(f"input {load.input} is not simulated (a session's prompts grow with its answers; a trace "
                         "keeps its own times)")
    if load.input != "prompts":
        sent = build_requests(load.model_copy(update={"requests": count, "duration_s": None}), Path(run.prompts), n,
                              ModelShape(run.model_path, vocab))
        return [_Request(r.input_tokens or len(r.prompt), r.max_tokens) for r in sent if not r.warmup]
    return [_Request(prompt_tokens[(load.warmup_requests + i) % len(prompt_tokens)], n) for i in range(count)]


def simulate(costs: StageCosts, requests: list[_Request], groups: int, max_batch: int, users: int | None = None,
             duration_s: float | None = None) -> list[float]:
    """Runs the server over `requests` (open loop: each one's arrival set; closed loop: `users` send them in
    order, each the next when its last one ended, none after `duration_s`), filling in when each token was handed
    out; returns each stage's busy time."""
    eff, pp = costs.eff, costs.pp
    if users is not None:
        for i, request in enumerate(requests[: max(1, users)]):
            request.arrival, request.user = 0.0, i
    unsent = collections.deque(r for r in requests if r.arrival == math.inf)  # closed loop: the users' next ones
    pending = collections.deque(sorted((r for r in requests if r.arrival < math.inf), key=lambda r: r.arrival))
    if duration_s:
        pending = collections.deque(r for r in pending if r.arrival <= duration_s)
    cores = [costs.ranks[s * costs.group].cores or (s,) for s in range(pp)]  # a GPU stage: a resource of its own
    free: dict[int, float] = collections.defaultdict(float)
    busy = [0.0] * pp
    waiting: collections.deque[_Request] = collections.deque()
    state = [_Group() for _ in range(groups)]
    per_group = max(1, math.ceil(max_batch / groups))
    flight: collections.deque[_Group] = collections.deque()
    now = 0.0

    @functools.cache
    def step_costs(rows: int, new: int, context: int) -> tuple[list[float], list[float]]:
        return costs.stage_times(rows, new, context)[0], costs.hop_times(rows, new)

    def occupy(stage: int, ready: float, seconds: float) -> float:
        start = max([ready] + [free[c] for c in cores[stage]])
        for c in cores[stage]:
            free[c] = start + seconds
        busy[stage] += seconds
        return start + seconds

    while True:
        while pending and pending[0].arrival <= now:  # stage 0 takes each request in (HTTP, tokenizing)
            waiting.append(pending.popleft())
            now = occupy(0, now, eff.serve_request_s)
        if not flight and not waiting and not any(g.running for g in state):
            if not pending:
                break
            now = pending[0].arrival
            continue
        for group in state:
            if group.back is not None:
                continue
            group.running = [r for r in group.running if not r.done]
            active = sum(len(g.rows) if g.back is not None else len(g.running) for g in state) + len(waiting)
            share = min(per_group, math.ceil(active / groups))
            joining = []
            while waiting and len(group.running) + len(joining) < share:
                joining.append(waiting.popleft())
            if not group.running and not joining:
                continue
            stage_s, hops = [0.0] * pp, [0.0] * pp
            if group.running:  # the group's cache is padded to its longest row (rounded up to 8 positions)
                context = max(r.prompt + len(r.times) for r in group.running)
                stage_s, hops = step_costs(len(group.running), 1, -(-context // 8) * 8)
            if joining:
                longest = max(r.prompt for r in joining)
                prefill, prefill_hops = step_costs(len(joining), longest, longest)
                stage_s = [a + b for a, b in zip(stage_s, prefill)]
                hops = [a + b for a, b in zip(hops, prefill_hops)]
            now = occupy(0, now, stage_s[0] + eff.serve_step_s)  # stage 0 runs its part in the engine thread
            back = now
            if pp > 1:
                ready = now + hops[0]
                for s in range(1, pp):
                    ready = occupy(s, ready, stage_s[s]) + hops[s]
                back = ready
            group.back, group.rows = back, group.running + joining
            flight.append(group)
        if not flight:
            continue
        group = flight.popleft()
        now = max(now, group.back or 0.0)
        for request in group.rows:
            request.times.append(now)
            now += eff.serve_token_s
            if request.done and request.user is not None and unsent:
                following = unsent.popleft()
                following.arrival, following.user = now, request.user
                if duration_s is None or now <= duration_s:
                    pending.append(following)
        occupy(0, now - eff.serve_token_s * len(group.rows), eff.serve_token_s * len(group.rows))
        group.running, group.rows, group.back = group.rows, [], None
    return busy


def predict_serving(run, facts: ModelFacts, machine: Machine, efficiency: dict[str, Efficiency],  # noqa: ANN001
                    prompt_tokens: list[int]) -> Prediction:
    """A served run's TTFT (mean), TPOT (median, as its p50 is compared), output tokens/s and per-rank busy time,
    from a simulation of the server on the run's load."""
    load = run.scenario
    groups = groups_of(run)
    costs = StageCosts(run, facts, machine, efficiency, together=groups > 1, stock_kernels=True)
    requests = workload(run, prompt_tokens, facts.vocab)
    if load.users is None:
        offsets = arrival_offsets(len(requests), load.rate, load.gap_shape, load.seed)
        for request, offset in zip(requests, offsets):
            request.arrival = offset
    busy = simulate(costs, requests, groups, load.max_batch, load.users, load.duration_s)
    records = [RequestRecord(i, str(i), r.arrival, sent_s=r.arrival, token_times_s=r.times, end_s=r.times[-1],
                             output_tokens=len(r.times), status=200) for i, r in enumerate(requests) if r.times]
    measured = summarize(records)  # as the client's records are summarized

    def value(v: float | None) -> float:
        return math.nan if v is None else v

    return Prediction(run.run_id, value(measured["ttft_s"]["mean"]), value(measured["tpot_s"]["p50"]),
                      value(measured["output_tokens_per_s"]), measured["duration_s"] or 0.0, measured["output_tokens"],
                      [busy[r // costs.group] for r in range(costs.pp * costs.group)])


def predict_any(run, facts: ModelFacts, machine: Machine, efficiency: dict[str, Efficiency],  # noqa: ANN001
                prompt_tokens: list[int]) -> Prediction:
    """A served run's prediction (predict_serving), or an offline run's (model.predict_run)."""
    predict = predict_serving if run.serving else predict_run
    return predict(run, facts, machine, efficiency, prompt_tokens)
