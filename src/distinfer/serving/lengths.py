"""Drawing token counts from a `LengthSpec`: fixed, uniform, normal or lognormal, clamped to min..max.

Lognormal takes the lengths' own mean and standard deviation (sigma^2 = ln(1 + (stdev/mean)^2),
mu = ln(mean) - sigma^2 / 2), so that `mean` means the same under every distribution. Where a spec has no
`max`, `limit` (what the model's positions leave) caps the tail, and MAX_LENGTH always does. Pure: no torch.
"""

from __future__ import annotations

import math
import random

from distinfer.scenario import MAX_LENGTH, LengthSpec


def draw_length(spec: LengthSpec, rng: random.Random, limit: int | None = None) -> int:
    """One token count; consumes the generator only where the distribution draws."""
    kind = spec.kind
    value: float
    if kind == "fixed":
        value = spec.mean
    elif kind == "uniform":
        low = max(spec.min, round(spec.mean * (1 - spec.spread)))
        high = round(spec.mean * (1 + spec.spread))
        if spec.max:
            high = min(high, spec.max)
        value = rng.randint(min(low, high), max(low, high))
    elif kind == "normal":
        value = rng.gauss(spec.mean, spec.stdev or 0.0)
    else:
        sigma2 = math.log1p(((spec.stdev or 0.0) / spec.mean) ** 2)
        value = rng.lognormvariate(math.log(spec.mean) - sigma2 / 2, math.sqrt(sigma2))  # a long tail: may be inf
    high = min(spec.max or limit or MAX_LENGTH, MAX_LENGTH)
    return max(spec.min, round(min(value, high)))
