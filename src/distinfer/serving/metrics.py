"""Serving metrics from raw request records, as vLLM's `bench serve` defines them (docs/metrics.md).

Per request: TTFT = first token - sent; E2E = end - sent; TPOT = (E2E - TTFT) / (output tokens - 1) for
requests of two tokens or more; ITL = every gap between consecutive streamed tokens, pooled over requests.
Over the measured (non-warm-up) requests: the duration runs from the first send to the last end; request and
output-token throughput divide by it; goodput counts the requests that met every SLO (DistServe's
definition), per second. Percentiles interpolate linearly (numpy's default). TTFT and E2E are also given from
each request's intended time (the schedule's), and the dispatch lag (sent - intended); `validity` says whether
the client delivered the load it was asked for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from distinfer.metrics import percentile
from distinfer.serving.records import RequestRecord

STATS = ("mean", "std", "p50", "p90", "p95", "p99")


def stats(values: list[float]) -> dict[str, float | None]:
    """mean, std (population), p50, p90, p95, p99; all None without values."""
    if not values:
        return dict.fromkeys(STATS)
    mean = sum(values) / len(values)
    return {"mean": mean, "std": math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)),
            "p50": percentile(values, 50), "p90": percentile(values, 90), "p95": percentile(values, 95),
            "p99": percentile(values, 99)}


def request_latencies(record: RequestRecord) -> dict[str, float | None]:
    """TTFT, TPOT and E2E of one finished request, in seconds (None where not defined), from its send; and TTFT
    and E2E from its intended time (the schedule's: what a user waiting in the schedule sees)."""
    if not record.ok or record.sent_s is None or record.end_s is None or not record.token_times_s:
        return {"ttft": None, "tpot": None, "e2e": None, "ttft_intended": None, "e2e_intended": None}
    ttft = record.token_times_s[0] - record.sent_s
    e2e = record.end_s - record.sent_s
    tpot = (e2e - ttft) / (record.output_tokens - 1) if record.output_tokens > 1 else None
    return {"ttft": ttft, "tpot": tpot, "e2e": e2e, "ttft_intended": record.token_times_s[0] - record.planned_s,
            "e2e_intended": record.end_s - record.planned_s}


def peak_concurrency(records: Iterable[RequestRecord]) -> int:
    """The most requests in flight at once (sent and not yet ended)."""
    events = []
    for r in records:
        if r.sent_s is not None:
            events += [(r.sent_s, 1), ((r.end_s if r.end_s is not None else math.inf), -1)]
    peak = current = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):  # an end before a send at the same instant
        current += step
        peak = max(peak, current)
    return peak


def meets(latency: Mapping[str, float | None], slo: Mapping[str, float]) -> bool:
    """Whether a request met every SLO (seconds: ttft, tpot, e2e); a TPOT limit is met by one-token answers."""
    for name, limit in slo.items():
        value = latency.get(name)
        if value is None and name == "tpot" and latency.get("e2e") is not None:
            continue
        if value is None or value > limit:
            return False
    return True


def summarize(records: list[RequestRecord], slo: Mapping[str, float] | None = None,
              offered_rate: float | None = None) -> dict:
    """The serving fields of summary.json from the measured records (warm-up requests left out)."""
    measured = [r for r in records if not r.warmup]
    done = [r for r in measured if r.ok]
    latencies = [request_latencies(r) for r in done]
    sent = [r.sent_s for r in measured if r.sent_s is not None]
    ends = [r.end_s for r in done if r.end_s is not None]
    duration = (max(ends) - min(sent)) if sent and ends else None
    per_second = (lambda n: n / duration if duration else None)
    output_tokens = sum(r.output_tokens for r in done)
    good = sum(meets(lat, slo) for lat in latencies) if slo else None
    send_span = max(sent) - min(sent) if len(sent) > 1 else None
    planned = [r.planned_s for r in measured]
    planned_span = max(planned) - min(planned) if len(planned) > 1 else None
    itl = [b - a for r in done for a, b in zip(r.token_times_s, r.token_times_s[1:])]
    return {
        "requests": len(measured),
        "completed": len(done),
        "errors": len(measured) - len(done),
        "error_examples": sorted({r.error or f"HTTP {r.status}" for r in measured if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": per_second(len(done)),
        "output_tokens": output_tokens,
        "output_tokens_per_s": per_second(output_tokens),
        "goodput": per_second(good) if good is not None else None,
        "slo": dict(slo or {}),
        "slo_attained": good / len(done) if good is not None and done else None,
        "offered_rate": offered_rate,
        "achieved_rate": (len(sent) - 1) / send_span if send_span else None,
        "peak_concurrency": peak_concurrency(measured),
        "ttft_s": stats([lat["ttft"] for lat in latencies if lat["ttft"] is not None]),
        "tpot_s": stats([lat["tpot"] for lat in latencies if lat["tpot"] is not None]),
        "itl_s": stats(itl),
        "e2e_s": stats([lat["e2e"] for lat in latencies if lat["e2e"] is not None]),
        "ttft_intended_s": stats([lat["ttft_intended"] for lat in latencies if lat["ttft_intended"] is not None]),
        "e2e_intended_s": stats([lat["e2e_intended"] for lat in latencies if lat["e2e_intended"] is not None]),
        "send_lag_s": lag_stats([r.sent_s - r.planned_s for r in measured if r.sent_s is not None]),
        "scheduled_rate": (len(planned) - 1) / planned_span if planned_span else None,
        "unsent": sum(r.sent_s is None for r in measured),
        **({"by_turn": by_turn(done, latencies)} if any(r.turn is not None for r in done) else {}),
    }


def lag_stats(lags: list[float]) -> dict[str, float | None]:
    """The dispatch lag (sent - intended): stats() and its max."""
    return {**stats(lags), "max": max(lags) if lags else None}


MIN_DELIVERED = 0.95  # of the schedule's send rate
CPU_SATURATED = 0.95  # of one core: the client's event loop runs on one


def validity(figures: Mapping, open_loop: bool, max_lag_s: float, cpu_share: float | None) -> dict:
    """Whether the load is what was asked, with the reasons it is not: requests sent below 95 % of the schedule's
    rate, dispatch lag p99 above `max_lag_s` (open loops: a closed loop sends when its users are free), the
    client's CPU saturated (its process CPU time over the load's wall time, against one core), or requests never
    sent. {valid, invalid_reasons}."""
    reasons = []
    scheduled, achieved = figures.get("scheduled_rate"), figures.get("achieved_rate")
    if open_loop and scheduled and achieved is not None and achieved < MIN_DELIVERED * scheduled:
        reasons.append(f"sent {achieved:.3g} requests/s, below {MIN_DELIVERED:.0%} of the schedule's {scheduled:.3g}/s")
    lag = (figures.get("send_lag_s") or {}).get("p99")
    if open_loop and lag is not None and lag > max_lag_s:
        reasons.append(f"dispatch lag p99 {lag * 1e3:.3g} ms above the limit of {max_lag_s * 1e3:g} ms")
    if cpu_share is not None and cpu_share >= CPU_SATURATED:
        reasons.append(f"the client's CPU was saturated ({cpu_share:.0%} of one core over the load)")
    if figures.get("unsent"):
        reasons.append(f"{figures['unsent']} requests were never sent")
    return {"valid": not reasons, "invalid_reasons": reasons}


def by_turn(done: list[RequestRecord], latencies: list[dict]) -> dict[str, dict]:
    """Multi-turn sessions: per turn index (from 0), its requests, prompt tokens and TTFT (the history grows)."""
    turns: dict[int, list[tuple[RequestRecord, dict]]] = {}
    for record, latency in zip(done, latencies, strict=True):
        turns.setdefault(record.turn or 0, []).append((record, latency))
    return {str(turn): {"requests": len(pairs),
                        "prompt_tokens": stats([r.prompt_tokens for r, _ in pairs if r.prompt_tokens is not None]),
                        "ttft_s": stats([lat["ttft"] for _, lat in pairs if lat["ttft"] is not None])}
            for turn, pairs in sorted(turns.items())}
