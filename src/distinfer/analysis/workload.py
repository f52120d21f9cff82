"""What a serving run's requests held, read from requests.jsonl: the prompt and output lengths the server
reported beside those the workload planned, and TTFT by shared-prefix group and by session turn.

`workload_table` gives one row per run and slice (`by` = all, group or turn; `key` the group or turn index)
with the measured requests, the planned and reported prompt and output tokens (p50 and the largest), and TTFT
p50 / p99. `lengths` gives the reported and planned lengths themselves, for the histograms.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from distinfer.serving.metrics import percentile


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "requests.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a killed run
        if isinstance(record, dict) and not record.get("warmup") and record.get("status") == 200:
            out.append(record)
    return out


def _ttft(record: dict) -> float | None:
    times, sent = record.get("token_times_s") or [], record.get("sent_s")
    return times[0] - sent if times and sent is not None else None


def lengths(folder: Path, run_ids: list[str]) -> pd.DataFrame:
    """One row per measured request of the runs: run_id, prompt_tokens, output_tokens (as the server reported),
    planned_input_tokens, planned_output_tokens, group, turn, ttft_s."""
    rows = []
    for run_id in run_ids:
        for record in _records(folder / run_id):
            rows.append({"run_id": run_id, **{k: record.get(k) for k in (
                "prompt_tokens", "output_tokens", "planned_input_tokens", "planned_output_tokens", "group", "turn")},
                "ttft_s": _ttft(record)})
    return pd.DataFrame(rows)


def _stat(values: pd.Series, q: float | None) -> float | None:
    values = [float(v) for v in values.dropna()]
    if not values:
        return None
    return max(values) if q is None else percentile(values, q)


def workload_table(requests: pd.DataFrame) -> pd.DataFrame:
    """Per run and slice: requests, planned and reported lengths, TTFT p50/p99 (empty without requests)."""
    if requests.empty:
        return pd.DataFrame()
    rows = []
    for run_id, run in requests.groupby("run_id", sort=False):
        slices = [("all", None, run)]
        for by in ("group", "turn"):
            if run[by].notna().any():
                slices += [(by, int(key), part) for key, part in run.groupby(by)]
        for by, key, part in slices:
            rows.append({"run_id": run_id, "by": by, "key": key, "requests": len(part),
                         "planned_input_p50": _stat(part["planned_input_tokens"], 50),
                         "prompt_tokens_p50": _stat(part["prompt_tokens"], 50),
                         "prompt_tokens_max": _stat(part["prompt_tokens"], None),
                         "planned_output_p50": _stat(part["planned_output_tokens"], 50),
                         "output_tokens_p50": _stat(part["output_tokens"], 50),
                         "ttft_p50_s": _stat(part["ttft_s"], 50), "ttft_p99_s": _stat(part["ttft_s"], 99)})
    return pd.DataFrame(rows)
