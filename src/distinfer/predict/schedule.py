"""The pipeline schedule: when micro-batches leave each stage, in prefill and in decode.

Stage s takes `stage_s[s]` per micro-batch; `hop_s[s]` is the message from stage s to s + 1, the last entry the
sampled tokens' way back from the last stage to the first. A stage works on one micro-batch at a time, in order.
"""

from __future__ import annotations

from collections.abc import Sequence


def prefill_finish(stage_s: Sequence[float], hop_s: Sequence[float], microbatches: int) -> list[float]:
    """When each micro-batch's first token is back at the first stage, with prefill starting at 0 on every
    micro-batch (fill and drain of a flow shop: stage s starts micro-batch j when it has finished j - 1 and
    stage s - 1's message for j has arrived)."""
    _check(stage_s, hop_s, microbatches)
    done = [0.0] * len(stage_s)  # when each stage finished its previous micro-batch
    finish = []
    for _ in range(microbatches):
        arrived = 0.0
        for s, t in enumerate(stage_s):
            done[s] = max(arrived, done[s]) + t
            arrived = done[s] + hop_s[s]
        finish.append(arrived)
    return finish


def first_tokens(stage_s: Sequence[float], hop_s: Sequence[float], microbatches: int,
                 first_decode_s: float) -> list[float]:
    """When the first stage takes each micro-batch's first token, as the engine runs it: the first stage starts
    every micro-batch's prefill before it takes any token, and after taking a micro-batch's token it runs that
    micro-batch's next forward (`first_decode_s`) before it takes the next micro-batch's token. So on one stage
    with 2 micro-batches the second waits for both prefills and the first one's decode forward."""
    arrived = prefill_finish(stage_s, hop_s, microbatches)
    free = microbatches * stage_s[0]  # the first stage's prefills, back to back from 0
    taken = []
    for at in arrived:
        free = max(at, free)
        taken.append(free)
        free += first_decode_s
    return taken


def decode_cycle(stage_s: Sequence[float], hop_s: Sequence[float], microbatches: int,
                 shared_s: Sequence[float] = ()) -> float:
    """Steady-state time between two tokens of one micro-batch. A micro-batch must come back from the last stage
    before its next token starts, so the cycle is at least one trip through every stage and hop; each stage
    serves every micro-batch once a cycle, so it is at least m x the slowest stage (with m micro-batches and p
    stages at most min(m, p) stages are busy at once); and a resource that several stages share (a core, a
    machine's memory bandwidth), busy `shared_s[i]` per micro-batch, serves every micro-batch in turn."""
    _check(stage_s, hop_s, microbatches)
    trip = sum(stage_s) + sum(hop_s)
    busiest = microbatches * max(stage_s)
    contended = microbatches * max(shared_s, default=0.0)
    return max(trip, busiest, contended)


def _check(stage_s: Sequence[float], hop_s: Sequence[float], microbatches: int) -> None:
    if not stage_s or len(hop_s) != len(stage_s):
        raise ValueError(f"{len(stage_s)} stage time(s) need as many hops (the last one back to the first stage); "
                         f"got {len(hop_s)}")
    if microbatches < 1:
        raise ValueError(f"micro-batches must be at least 1 (got {microbatches})")
