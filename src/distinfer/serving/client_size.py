"""How many worker processes a client host needs for a load (`scenario.client.processes: auto`).

The client's cost, measured against the mock server (bench/client_cost.py, docs/performance.md): about 10 us of
CPU per streamed chunk, and about 340 us per request of 8 tokens in a closed loop that saturated one core (so
about 260 us per request besides its chunks). A process is given at most half a core's worth of that work, so
that its event loop is idle often enough to send each request on time; the count is capped at the host's usable
cores. An open loop's planned pace is known (its rate, or a trace's times); a closed loop's and rate inf's are
set by the server, and get one process: if that one saturates, the load is marked invalid and says so.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from distinfer.serving.client import Request

CHUNK_COST_S = 10e-6
REQUEST_COST_S = 260e-6
BUSY_BUDGET = 0.5  # of one core, per worker process


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def planned_rate(requests: Sequence[Request], rate: float | None) -> float | None:
    """Requests per second the schedule asks of this host: the rate, or a replayed trace's count over its span;
    None where the server sets the pace (closed loop, rate inf)."""
    if rate is not None:
        return rate if math.isfinite(rate) else None
    times = [r.at_s for r in requests if r.at_s is not None]
    if len(times) < 2 or max(times) <= min(times):
        return None
    return (len(times) - 1) / (max(times) - min(times))


def processes_for(requests: Sequence[Request], rate: float | None, cores: int | None = None) -> int:
    """Worker processes for the measured `requests` sent at `rate` (None: at their own `at_s`, or a closed loop
    when they have none), at most `cores` (default: this process's usable cores)."""
    measured = [r for r in requests if not r.warmup]
    pace = planned_rate(measured, rate)
    if pace is None or not measured:
        return 1
    chunks = sum(r.max_tokens for r in measured) / len(measured)
    busy = pace * (REQUEST_COST_S + chunks * CHUNK_COST_S)
    return max(1, min(math.ceil(busy / BUSY_BUDGET), cores or usable_cores()))


def worker_processes(setting: int | str, requests: Sequence[Request], rate: float | None = None) -> int:
    """`scenario.client.processes` for these requests on this host: the number given, or for auto as many as
    processes_for asks (`rate` None: the requests' own send offsets, as a share dealt to a node carries)."""
    return processes_for(requests, rate) if setting == "auto" else int(setting)
