"""When each request is sent: an open loop at a rate (Poisson, or gamma with a burstiness) or all at once.

As vLLM's `bench serve`: inter-arrival gaps are gamma-distributed with shape = burstiness and mean
1 / rate (burstiness 1 is a Poisson process; below 1 burstier, above 1 more even), drawn from a generator
seeded by the scenario, so the schedule is the same on every run. Burstiness inf is the limit of ever more even
gaps: constant ones, 1 / rate each (`arrivals: constant`). Rate `inf` sends every request at time 0.
"""

from __future__ import annotations

import math
import random


def arrival_offsets(count: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Planned send times in seconds from the start, the first at 0 (or every one at 0 for rate inf)."""
    if count < 0:
        raise ValueError("count must be >= 0")
    if not rate > 0:
        raise ValueError(f"rate must be > 0 (got {rate})")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0 (got {burstiness})")
    if math.isinf(rate):
        return [0.0] * count
    if math.isinf(burstiness):
        return [index / rate for index in range(count)]
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)
    offsets, now = [], 0.0
    for index in range(count):
        if index:
            now += rng.gammavariate(burstiness, scale)
        offsets.append(now)
    return offsets


def planned_offsets(times: list[float | None], rate: float | None, burstiness: float = 1.0,
                    seed: int = 0) -> list[float]:
    """Each request's send offset: drawn for `rate` (arrival_offsets), or the requests' own `times` (a replayed
    trace's) where there is no rate. The one place where an open loop's offsets are chosen."""
    if rate is not None:
        return arrival_offsets(len(times), rate, burstiness, seed)
    if None in times:
        raise ValueError("requests without a rate need their send times")
    return [float(t) for t in times]  # type: ignore[arg-type]
