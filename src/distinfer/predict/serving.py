"""Serving runs predicted: distinfer's server (continuous batching over groups of requests, a group per stage at
least) under an open-loop rate or a closed-loop number of users, from the same stage costs as offline batches.

With N requests decoding, a token step of the whole running batch takes the offline model's decode cycle at
batch N (the server's groups as micro-batches); a request that joins pays one prefill of its prompt and waits half
a step on average. Open loop at rate r: N is the fixed point of Little's law, N = r x (TTFT + (n - 1) x TPOT), with
the time the stages spend prefilling joiners (r x one prefill a second) stretching the steps; a rate beyond what
`max_batch` requests can carry saturates: tokens/s stop growing and requests queue. Rate `inf` sends every
request at once: waves of `max_batch`. Closed loop with u users: N = min(u, max_batch). The server runs the
layers through transformers' own forward (stock CPU kernels), which the prediction assumes too.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

from distinfer.memory import ModelFacts
from distinfer.predict.model import Efficiency, Machine, Prediction, predict_run
from distinfer.serving.workload import DEFAULT_REQUESTS

MAX_PREFILL_SHARE = 0.9  # of a stage's time spent prefilling joiners, beyond which the rate is saturated


def predict_serving(run, facts: ModelFacts, machine: Machine, efficiency: dict[str, Efficiency],  # noqa: ANN001
                    prompt_tokens: list[int]) -> Prediction:
    scenario = run.scenario or {}
    synthetic = scenario.get("synthetic") if scenario.get("input") == "synthetic" else None
    n = int(synthetic["output_tokens"]["mean"]) if synthetic else int(run.generation["max_new_tokens"])
    length = int(synthetic["input_tokens"]["mean"]) if synthetic else round(statistics.mean(prompt_tokens))
    groups = max(run.pp, run.microbatches) if run.engine == "pipeline" else run.pp if run.engine == "vllm" else 1
    cap = int(scenario.get("max_batch", 32))
    requests = int(scenario.get("requests") or DEFAULT_REQUESTS)

    def step(rows: int) -> Prediction:
        """The offline model at a running batch of `rows` requests split over the server's groups."""
        rows = max(1, min(cap, rows))
        batch = dataclasses.replace(run, scenario=None, batch_size=rows, microbatches=min(groups, rows),
                                    num_prompts=rows, cpu_kernels="stock",
                                    generation={**run.generation, "max_new_tokens": n})
        return predict_run(batch, facts, machine, efficiency, [length] * rows)

    alone = step(1)
    prefill = alone.ttft_s  # one joiner's prefill (and the batch set-up)

    def latency(rows: int, rate: float) -> tuple[float, float, float]:
        """TTFT, TPOT and E2E with `rows` requests running and joiners arriving at `rate`."""
        running = step(rows)
        stretch = 1 / (1 - min(MAX_PREFILL_SHARE, rate * prefill))
        tpot = running.tpot_s * stretch
        ttft = prefill + tpot / 2
        return ttft, tpot, ttft + (n - 1) * tpot

    kind, value = scenario.get("load"), scenario.get("value")
    if kind == "concurrency":
        rows = min(int(value), cap)
        ttft, tpot, e2e = latency(rows, 0.0)
        tokens_per_s = rows * n / e2e
    else:
        rate = math.inf if value in ("inf", None) else float(value)
        full_ttft, full_tpot, full_e2e = latency(cap, 0.0)
        capacity = cap * n / full_e2e
        if math.isinf(rate) or rate * n >= capacity or rate * prefill >= MAX_PREFILL_SHARE:
            waves = max(1, math.ceil(requests / cap))
            ttft, tpot, tokens_per_s = full_ttft + full_e2e * (waves - 1) / 2, full_tpot, capacity
        else:
            rows = 1.0
            for _ in range(40):
                ttft, tpot, e2e = latency(round(rows), rate)
                rows = 0.5 * rows + 0.5 * max(1.0, min(cap, rate * e2e))
            tokens_per_s = rate * n
    tokens = requests * n
    wall = tokens / tokens_per_s
    share = [b / alone.wall_s for b in alone.rank_busy_s] if alone.wall_s else []
    return Prediction(run.run_id, ttft, tpot, tokens_per_s, wall, tokens, [min(1.0, s) * wall for s in share])


def predict_any(run, facts: ModelFacts, machine: Machine, efficiency: dict[str, Efficiency],  # noqa: ANN001
                prompt_tokens: list[int]) -> Prediction:
    """A served run's prediction (predict_serving), or an offline run's (model.predict_run)."""
    predict = predict_serving if run.serving else predict_run
    return predict(run, facts, machine, efficiency, prompt_tokens)
