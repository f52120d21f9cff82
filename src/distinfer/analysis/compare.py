"""`distinfer compare BASE NEW`: better, worse or the same, and how sure, for every run two studies share.

Runs are matched by what they measured (model, engine, layout, batch size, precision, scenario and load), not
by folder name; runs of one side only are listed. For each matched run and metric the change is NEW / BASE - 1,
with a 95 % interval from a bootstrap over the runs' own samples: each resample draws the requests (a serving
run's requests.jsonl) or the batches and requests (an offline run's samples.json) of both runs with
replacement, requests in blocks of consecutive ones (`blocks`), and computes the metric as the summary does.
The verdict, against a threshold per metric (default 5 %): `regressed` when the whole interval lies beyond the
threshold on the worse side, `improved` on the better side, else `unchanged` (`confident` says whether the
interval decided it: a change beyond the threshold whose interval reaches back inside it is unchanged; a tail
percentile with fewer than TAIL_SAMPLES requests beyond it gets no interval and stays unchanged; a metric
measured once per run, peak memory, is judged by its point change, never with confidence). Only confident
regressions fail the comparison. The interval covers the
variation inside each run; other runs of the baseline study (`--base-repeat`) add the drift between runs.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from distinfer.analysis.bundles import _read, load_experiment_outputs

METRICS = ("output_tokens_per_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "e2e_p50_s",
           "e2e_p99_s", "goodput", "peak_memory_bytes")
HIGHER_IS_BETTER = {"output_tokens_per_s", "goodput"}
KEY = ("model", "engine", "layout", "batch_size", "precision", "scenario", "load", "load_value")
SAMPLE_FIELDS = ("ttft_s", "tpot_s", "e2e_s", "batch_wall_s", "batch_output_tokens")  # samples.json
RESAMPLES = 2000
LEVEL = 0.95
TAIL = re.compile(r"^\w+_p(\d+)_s$")
TAIL_SAMPLES = 3  # requests beyond a percentile that its interval needs (a p99: 300 requests)


class CompareError(ValueError):
    """Inputs that cannot be compared (no run in common, an unknown metric, a folder without runs)."""


@dataclass
class Samples:
    """One run's raw values: per request TTFT / TPOT / E2E and output tokens (and whether it met the SLOs), and
    for an offline run each batch's wall time and tokens; `duration_s` a serving run's measured span."""

    ttft: np.ndarray
    tpot: np.ndarray
    e2e: np.ndarray
    tokens: np.ndarray
    good: np.ndarray | None = None
    batch_wall: np.ndarray | None = None
    batch_tokens: np.ndarray | None = None
    duration_s: float | None = None

    def statistic(self, metric: str, requests: np.ndarray, batches: np.ndarray | None) -> float:
        """`metric` over the resampled request and batch indices (NaN where this run cannot give it)."""
        name, _, stat = metric.removesuffix("_s").rpartition("_")
        if metric == "output_tokens_per_s":
            if self.batch_wall is not None and self.batch_tokens is not None and batches is not None and batches.size:
                return float(self.batch_tokens[batches].sum() / self.batch_wall[batches].sum())
            if self.duration_s:
                return float(self.tokens[requests].sum() / self.duration_s)
            return math.nan
        if metric == "goodput":
            return float(self.good[requests].sum() / self.duration_s) if self.good is not None and \
                self.duration_s else math.nan
        values = {"ttft": self.ttft, "tpot": self.tpot, "e2e": self.e2e}.get(name)
        if values is None or stat not in ("p50", "p99"):
            return math.nan
        picked = values[requests]
        picked = picked[~np.isnan(picked)]
        return float(np.percentile(picked, float(stat[1:]))) if picked.size else math.nan


def _floats(values: list) -> np.ndarray:
    return np.array([math.nan if v is None else float(v) for v in values], dtype=float)


def load_samples(run_dir: Path, slo: dict[str, float] | None = None) -> Samples | None:
    """The samples of one bundle: requests.jsonl's measured requests where the run has it (serving runs and
    runs through a server), else samples.json (offline ranks); None where it has neither."""
    from distinfer.serving.metrics import meets, request_latencies
    from distinfer.serving.records import RequestRecord

    samples_json = run_dir / "samples.json"
    requests_jsonl = run_dir / "requests.jsonl"
    if samples_json.is_file():
        data, _ = _read(samples_json)
        if data is None or not all(isinstance(data.get(k), list) for k in SAMPLE_FIELDS):
            return None  # damaged: the run's metrics are compared without an interval
        return Samples(_floats(data["ttft_s"]), _floats(data["tpot_s"]), _floats(data["e2e_s"]),
                       np.zeros(len(data["ttft_s"])), batch_wall=_floats(data["batch_wall_s"]),
                       batch_tokens=_floats(data["batch_output_tokens"]))
    if not requests_jsonl.is_file():
        return None
    records = []
    for line in requests_jsonl.read_text().splitlines():
        try:
            records.append(RequestRecord.from_dict(json.loads(line)))
        except (ValueError, TypeError):
            break  # a torn last line
    measured = [r for r in records if not r.warmup]
    done = sorted((r for r in measured if r.ok), key=lambda r: r.sent_s or 0.0)  # in sending order: blocks()
    if not done:
        return None
    latencies = [request_latencies(r) for r in done]
    sent = [r.sent_s for r in measured if r.sent_s is not None]
    ends = [r.end_s for r in done if r.end_s is not None]
    return Samples(_floats([lat["ttft"] for lat in latencies]), _floats([lat["tpot"] for lat in latencies]),
                   _floats([lat["e2e"] for lat in latencies]), _floats([r.output_tokens for r in done]),
                   good=np.array([meets(lat, slo) for lat in latencies]) if slo else None,
                   duration_s=(max(ends) - min(sent)) if sent and ends else None)


def experiment_folders(folder: Path) -> list[Path]:
    """An experiment's output folder itself, or each experiment folder under an outputs root."""
    if not folder.is_dir():
        raise CompareError(f"{folder}: no such folder")
    if any((child / "run.json").is_file() for child in folder.iterdir() if child.is_dir()):
        return [folder]
    found = [child for child in sorted(folder.iterdir()) if child.is_dir() and
             any((run / "run.json").is_file() for run in child.iterdir() if run.is_dir())]
    if not found:
        raise CompareError(f"{folder}: no runs here (an experiment's output folder, or a folder of them)")
    return found


def runs_of(folder: Path) -> dict[tuple, tuple[dict, Path]]:
    """Every finished run under `folder` by its key (what it measured): (its table row, its bundle)."""
    runs: dict[tuple, tuple[dict, Path]] = {}
    for experiment in experiment_folders(folder):
        loaded = load_experiment_outputs(experiment)
        for row in loaded.runs.to_dict("records"):
            row["model"] = loaded.model
            for column in ("load", "load_value"):
                row.setdefault(column, None)
            key = tuple(None if _missing(row.get(k)) else row.get(k) for k in KEY)
            runs.setdefault(key, (row, experiment / str(row["run_id"])))
    return runs


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def parse_thresholds(default: str, overrides: list[str]) -> dict[str, float]:
    """'5%' (or 0.05) for every metric, then 'metric=10%' each; CompareError naming a bad one."""
    def fraction(text: str, what: str) -> float:
        try:
            value = float(text.strip().removesuffix("%")) / (100 if text.strip().endswith("%") else 1)
        except ValueError:
            raise CompareError(f"{what}: {text!r} is not a threshold (e.g. 5% or 0.05)") from None
        if not 0 <= value < 10:
            raise CompareError(f"{what}: {text!r} is out of range (0% to 1000%)")
        return value

    thresholds = dict.fromkeys(METRICS, fraction(default, "--threshold"))
    for item in overrides:
        metric, sep, value = item.partition("=")
        if not sep or metric not in METRICS:
            raise CompareError(f"--threshold {item!r}: give METRIC=VALUE with a metric of {', '.join(METRICS)}")
        thresholds[metric] = fraction(value, f"--threshold {metric}")
    return thresholds


def blocks(count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` indices of a circular block bootstrap: runs of about sqrt(count) consecutive requests (in the order
    they were sent) from random starts. Requests sent close together share a batch and a server's state, so
    they are not independent draws; resampling them one by one would give intervals too narrow."""
    length = max(1, math.ceil(math.sqrt(count)))
    starts = rng.integers(0, count, math.ceil(count / length))
    return ((starts[:, None] + np.arange(length)[None, :]) % count).ravel()[:count]


def _change_interval(base: Samples, new: Samples, metric: str, rng: np.random.Generator) -> tuple[float, float, float]:
    """(point change, interval low, interval high) of NEW / BASE - 1 for `metric` (NaN where undefined)."""
    def indices(samples: Samples) -> tuple[np.ndarray, np.ndarray | None]:
        batches = None if samples.batch_wall is None else np.arange(samples.batch_wall.size)
        return np.arange(samples.ttft.size), batches

    b_req, b_bat = indices(base)
    n_req, n_bat = indices(new)
    point_base = base.statistic(metric, b_req, b_bat)
    point_new = new.statistic(metric, n_req, n_bat)
    if not (point_base and math.isfinite(point_base) and math.isfinite(point_new)):
        return math.nan, math.nan, math.nan
    percent = TAIL.match(metric)
    if percent and min(b_req.size, n_req.size) * (1 - int(percent.group(1)) / 100) < TAIL_SAMPLES:
        return point_new / point_base - 1, math.nan, math.nan  # a tail of too few requests has no interval
    changes = []
    for _ in range(RESAMPLES):
        draw = [blocks(b_req.size, rng), None if b_bat is None else rng.choice(b_bat, b_bat.size),
                blocks(n_req.size, rng), None if n_bat is None else rng.choice(n_bat, n_bat.size)]
        stat_base = base.statistic(metric, draw[0], draw[1])
        stat_new = new.statistic(metric, draw[2], draw[3])
        if stat_base and math.isfinite(stat_base) and math.isfinite(stat_new):
            changes.append(stat_new / stat_base - 1)
    if len(changes) < RESAMPLES // 2:
        return point_new / point_base - 1, math.nan, math.nan
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(changes, [tail, 100 - tail])
    return point_new / point_base - 1, float(low), float(high)


def verdict(metric: str, change: float, low: float, high: float, threshold: float,
            sampled: bool = False) -> tuple[str, bool]:
    """(improved | regressed | unchanged, whether the interval decided it). Without an interval: `sampled`
    (the runs had samples, too few for this metric) leaves it unchanged; a metric measured once per run (peak
    memory) is judged by its point change, never with confidence."""
    sign = 1 if metric in HIGHER_IS_BETTER else -1
    if math.isnan(change) or math.isnan(low) and sampled:
        return "unchanged", False
    if math.isnan(low):
        better = sign * change
        return ("improved" if better > threshold else "regressed" if better < -threshold else "unchanged"), False
    worst, best = sorted((sign * low, sign * high))
    if worst > threshold:
        return "improved", True
    if best < -threshold:
        return "regressed", True
    return "unchanged", worst > -threshold and best < threshold


def compare(base: Path, new: Path, thresholds: dict[str, float], metrics: list[str] | None = None,
            seed: int = 0, base_repeats: list[Path] | None = None) -> tuple[pd.DataFrame, list[str], list[str]]:
    """The table of changes (one row per matched run and metric), and the run ids found only in BASE and only in
    NEW. `base_repeats`: other runs of the baseline study; the largest change of a run between them and BASE
    (the machine's drift from run to run, which no resampling inside a run shows) widens the interval on both
    sides (`drift` in the table). CompareError when no run is in common or a metric is unknown."""
    wanted = metrics or list(METRICS)
    unknown = [m for m in wanted if m not in METRICS]
    if unknown:
        raise CompareError(f"unknown metric {unknown[0]!r}; metrics: {', '.join(METRICS)}")
    base_runs, new_runs = runs_of(base), runs_of(new)
    common = [key for key in base_runs if key in new_runs]
    only_base = sorted(str(base_runs[k][0]["run_id"]) for k in base_runs if k not in new_runs)
    only_new = sorted(str(new_runs[k][0]["run_id"]) for k in new_runs if k not in base_runs)
    if not common:
        raise CompareError(f"{base} and {new} have no run in common (matched by model, engine, layout, batch "
                           "size, precision, scenario and load)")
    rng = np.random.default_rng(seed)
    repeats = [runs_of(folder) for folder in base_repeats or []]
    rows = []
    for key in common:
        (b_row, b_dir), (n_row, n_dir) = base_runs[key], new_runs[key]
        slo = {k.removeprefix("slo_").removesuffix("_s"): v for k, v in n_row.items()
               if k.startswith("slo_") and k.endswith("_s") and not _missing(v)}
        b_samples, n_samples = load_samples(b_dir, slo), load_samples(n_dir, slo)
        for metric in wanted:
            b_value, n_value = _point(b_row, metric), _point(n_row, metric)
            if _missing(b_value) or _missing(n_value):
                continue
            sampled = b_samples is not None and n_samples is not None and metric != "peak_memory_bytes"
            if sampled:
                change, low, high = _change_interval(b_samples, n_samples, metric, rng)
            else:
                change, low, high = math.nan, math.nan, math.nan
            if math.isnan(change) and b_value:
                change = n_value / b_value - 1
            drifts = [abs(value / b_value - 1) for value in (_point(r[key][0], metric) for r in repeats if key in r)
                      if value is not None and b_value]
            drift = max(drifts) if drifts else math.nan
            if drifts:
                low, high = low - drift, high + drift
            decided, confident = verdict(metric, change, low, high, thresholds[metric], sampled)
            note = "" if not math.isnan(low) else "too few requests" if sampled else "no samples"
            rows.append({"run_id": n_row["run_id"], "base_run_id": b_row["run_id"], "layout": n_row.get("layout"),
                         "engine": n_row.get("engine"), "metric": metric, "base": b_value, "new": n_value,
                         "change": change, "change_low": low, "change_high": high, "threshold": thresholds[metric],
                         "drift": drift, "verdict": decided, "confident": confident, "note": note})
    return pd.DataFrame(rows), only_base, only_new


def _point(row: dict, metric: str) -> float | None:
    value = row.get(metric)
    return None if _missing(value) else float(value)


def write_outputs(table: pd.DataFrame, out: Path, base: Path, new: Path, only_base: list[str],
                  only_new: list[str]) -> Path:
    """compare.csv and compare.html (the table and a plot of each change with its interval) in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "compare.csv", index=False)
    shown = table[table["metric"] != "peak_memory_bytes"]
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.28 * len(shown) + 1)))
    labels = [f"{r.run_id}: {r.metric}" for r in shown.itertuples()]
    colors = {"regressed": "tab:red", "improved": "tab:green", "unchanged": "tab:gray"}
    for y, r in enumerate(shown.itertuples()):
        low = r.change_low if not math.isnan(r.change_low) else r.change
        high = r.change_high if not math.isnan(r.change_high) else r.change
        ax.errorbar([100 * r.change], [y], xerr=[[100 * (r.change - low)], [100 * (high - r.change)]], fmt="o",
                    color=colors[r.verdict], capsize=3)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("change NEW / BASE - 1 (%), 95 % interval")
    ax.set_title(f"{new.name} against {base.name}")
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=100)
    plt.close(fig)
    unmatched = "".join(f"<li>only in {side}: {', '.join(ids)}</li>" for side, ids in
                        (("BASE", only_base), ("NEW", only_new)) if ids)
    (out / "compare.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>distinfer compare</title></head><body>"
        f"<h1>{new} against {base}</h1><ul>{unmatched or '<li>every run matched</li>'}</ul>"
        f"<img src='compare.png' alt='each change with its 95 % interval'>"
        f"{table.to_html(index=False, float_format=lambda v: f'{v:.4g}')}</body></html>")
    return out
