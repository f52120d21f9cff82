"""Latency and throughput metrics, defined as vLLM `bench serve` defines them. Pure Python, no torch.

Per request (one prompt): TTFT = first token time - batch start; E2E = last token time - batch start;
TPOT = (E2E - TTFT) / (tokens - 1); ITL = gaps between consecutive tokens. Raw values are kept and
percentiles are taken over all of them, never averages of averages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), q in [0, 100]."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    """mean, p50, p90, p99 of raw values (all None when there are none)."""
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    return {
        "mean": sum(values) / len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
    }


@dataclass(frozen=True)
class RequestTiming:
    """Token arrival times of one request, in seconds since its batch started."""

    token_times: tuple[float, ...]

    @property
    def ttft(self) -> float:
        return self.token_times[0]

    @property
    def e2e(self) -> float:
        return self.token_times[-1]

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.e2e - self.ttft) / (n - 1) if n > 1 else None

    @property
    def itl(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


@dataclass
class LatencyReport:
    """Raw per-request values of the measured iterations and the throughput they give."""

    requests: list[RequestTiming] = field(default_factory=list)
    wall_s: float = 0.0  # summed wall time of the measured batches
    batches: list[tuple[float, int]] = field(default_factory=list)  # each measured batch's wall s and tokens

    def add_batch(self, token_times: Sequence[Sequence[float]], wall_s: float) -> None:
        self.requests.extend(RequestTiming(tuple(t)) for t in token_times if t)
        self.wall_s += wall_s
        self.batches.append((wall_s, sum(len(t) for t in token_times)))

    def samples(self) -> dict:
        """The raw values behind the summary (samples.json): each batch's wall time and output tokens, each
        request's TTFT, TPOT and E2E; `distinfer compare` draws its intervals from them."""
        return {"batch_wall_s": [b[0] for b in self.batches], "batch_output_tokens": [b[1] for b in self.batches],
                "ttft_s": [r.ttft for r in self.requests], "tpot_s": [r.tpot for r in self.requests],
                "e2e_s": [r.e2e for r in self.requests]}

    def summary(self) -> dict:
        tokens = sum(len(r.token_times) for r in self.requests)
        tpots = [r.tpot for r in self.requests if r.tpot is not None]
        return {
            "output_tokens": tokens,
            "output_tokens_per_s": tokens / self.wall_s if self.wall_s > 0 else None,
            "prompts_per_s": len(self.requests) / self.wall_s if self.wall_s > 0 else None,
            "wall_s": self.wall_s,
            "ttft_s": distribution([r.ttft for r in self.requests]),
            "tpot_s": distribution(tpots),
            "itl_s": distribution([gap for r in self.requests for gap in r.itl]),
            "e2e_s": distribution([r.e2e for r in self.requests]),
        }


def rank_totals(steps: Sequence[dict]) -> dict[str, float]:
    """Per-rank sums of the raw step timings: compute, communication (send) and waiting (receive)."""
    return {
        "compute_s": sum(s["compute_s"] for s in steps),
        "comm_s": sum(s["send_s"] for s in steps),
        "wait_s": sum(s["wait_s"] for s in steps),
    }
