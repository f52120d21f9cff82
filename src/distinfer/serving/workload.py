"""What a serving run sends: the experiment's prompts, cycled, or synthetic token-id prompts of given lengths.

Synthetic lengths are drawn uniformly from mean x (1 - spread) .. mean x (1 + spread), clipped to min .. max,
and their token ids uniformly below the vocabulary size, from a generator seeded by the scenario: the same
scenario sends the same requests on every run and to every server.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from distinfer.prompts import load_prompts
from distinfer.scenario import LengthSpec, RunLoad
from distinfer.serving.client import Request

DEFAULT_REQUESTS = 64


def request_count(load: RunLoad) -> int:
    """Measured requests: `requests`, else rate x duration (open loop), else DEFAULT_REQUESTS."""
    if load.requests:
        return load.requests
    if load.duration_s and load.rate is not None and math.isfinite(load.rate):
        return max(1, math.ceil(load.rate * load.duration_s))
    if load.duration_s:
        return 1_000_000  # closed loop, or everything at once: the duration ends it
    return DEFAULT_REQUESTS


def _length(spec: LengthSpec, rng: random.Random) -> int:
    low = max(spec.min, round(spec.mean * (1 - spec.spread)))
    high = round(spec.mean * (1 + spec.spread))
    if spec.max:
        high = min(high, spec.max)
    return rng.randint(min(low, high), max(low, high))


def build_requests(load: RunLoad, prompts_file: Path, max_new_tokens: int, vocab_size: int | None) -> list[Request]:
    """The warm-up requests, then the measured ones, indexed in sending order."""
    count = request_count(load)
    warmup = load.warmup_requests
    rng = random.Random(load.seed)
    requests = []
    if load.synthetic is not None:
        synthetic = load.synthetic
        vocab = synthetic.vocab_size or vocab_size
        if not vocab:
            raise ValueError("synthetic prompts need a vocabulary size: scenario.synthetic.vocab_size, or a model "
                             "whose config names one")
        for index in range(warmup + min(count, 100_000)):
            prompt = [rng.randrange(vocab) for _ in range(_length(synthetic.input_tokens, rng))]
            requests.append(Request(index, f"synthetic-{index}", prompt, _length(synthetic.output_tokens, rng),
                                    load.ignore_eos, warmup=index < warmup))
        return requests
    prompts = load_prompts(prompts_file)
    for index in range(warmup + min(count, 100_000)):
        prompt = prompts[index % len(prompts)]
        requests.append(Request(index, prompt.id, prompt.prompt, max_new_tokens, load.ignore_eos,
                                warmup=index < warmup))
    return requests
