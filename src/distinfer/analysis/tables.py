"""Derived tables: scaling, batch sweep, correctness against the reference, per-rank time split."""

from __future__ import annotations

import pandas as pd

from distinfer.analysis.bundles import LoadedExperiment


def strong_scaling(runs: pd.DataFrame) -> pd.DataFrame:
    """Fixed work, more ranks: speedup S(n) = T(1)/T(n) = throughput(n)/throughput(1), efficiency S(n)/n.

    Compared within one engine, batch size, dtype and micro-batch count; the baseline is that group's
    one-rank run.
    """
    if runs.empty:
        return pd.DataFrame()
    keys = ["engine", "batch_size", "dtype", "microbatches"]
    out = []
    for _, group in runs[runs["engine"] != "reference"].groupby(keys):
        base = group[group["world_size"] == 1]
        if base.empty or len(group) < 2:
            continue
        t1 = float(base["output_tokens_per_s"].iloc[0])
        for _, row in group.sort_values("world_size").iterrows():
            speedup = float(row["output_tokens_per_s"]) / t1
            out.append({**{k: row[k] for k in keys}, "world_size": row["world_size"], "run_id": row["run_id"],
                        "output_tokens_per_s": row["output_tokens_per_s"], "speedup": speedup,
                        "efficiency": speedup / row["world_size"]})
    return pd.DataFrame(out)


def weak_scaling(t1: float, tn: float) -> float:
    """Weak-scaling efficiency: work grows with n, so the ideal is equal time: T(1)/T(n)."""
    return t1 / tn


def batch_sweep(runs: pd.DataFrame) -> pd.DataFrame:
    """Throughput, latency and memory per batch size, for each engine and layout."""
    if runs.empty:
        return pd.DataFrame()
    cols = ["engine", "world_size", "microbatches", "dtype", "batch_size", "output_tokens_per_s", "prompts_per_s",
            "ttft_p50_s", "tpot_p50_s", "e2e_p90_s", "peak_memory_bytes", "run_id"]
    return runs[[c for c in cols if c in runs]].sort_values(["engine", "world_size", "microbatches", "batch_size"])


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (None when equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def correctness(loaded: LoadedExperiment) -> pd.DataFrame:
    """Each run against the reference run of the same batch size and dtype: exact-match rate, first divergence."""
    runs = loaded.runs
    if runs.empty:
        return pd.DataFrame()
    out = []
    refs = runs[runs["engine"] == "reference"]
    for _, row in runs[runs["engine"] != "reference"].iterrows():
        ref = refs[(refs["batch_size"] == row["batch_size"]) & (refs["dtype"] == row["dtype"])]
        if ref.empty:
            continue
        ref_tokens = loaded.completions.get(ref["run_id"].iloc[0], [])
        tokens = loaded.completions.get(row["run_id"], [])
        pairs = list(zip(tokens, ref_tokens))
        divergences = [d for d in (first_divergence(a, b) for a, b in pairs) if d is not None]
        out.append({"run_id": row["run_id"], "reference": ref["run_id"].iloc[0], "prompts": len(pairs),
                    "exact_match_rate": (len(pairs) - len(divergences)) / len(pairs) if pairs else None,
                    "first_divergence_min": min(divergences) if divergences else None})
    return pd.DataFrame(out)


def time_breakdown(ranks: pd.DataFrame) -> pd.DataFrame:
    """Per rank: seconds of compute, communication (sends) and waiting (blocked receives), and their shares."""
    if ranks.empty:
        return pd.DataFrame()
    out = ranks.copy()
    total = out[["compute_s", "comm_s", "wait_s"]].sum(axis=1)
    for col in ("compute_s", "comm_s", "wait_s"):
        out[col.replace("_s", "_share")] = out[col] / total.where(total > 0)
    return out
