"""Derived tables: scaling, batch sweep, correctness against the reference, per-rank time split."""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd

from distinfer.analysis.bundles import LoadedExperiment


SCALING_KEYS = ["engine", "batch_size", "precision", "microbatches"]


def _scaling_groups(runs: pd.DataFrame) -> Iterator[tuple[pd.DataFrame, pd.Series]]:
    """Groups of non-reference runs that differ only in their rank count, each with its one-rank run."""
    for _, group in runs[runs["engine"] != "reference"].groupby(SCALING_KEYS):
        base = group[group["world_size"] == 1]
        if not base.empty and len(group) >= 2:
            yield group.sort_values("world_size"), base.iloc[0]


def strong_scaling(runs: pd.DataFrame) -> pd.DataFrame:
    """Fixed work, more ranks: speedup S(n) = T(1)/T(n) = throughput(n)/throughput(1), efficiency S(n)/n.

    Compared within one engine, batch size, precision and micro-batch count; the baseline is that group's
    one-rank run. Weak-scaling runs (prompts growing with n) are left out.
    """
    if runs.empty:
        return pd.DataFrame()
    fixed = runs[runs["num_prompts"].isna()] if "num_prompts" in runs else runs
    out = []
    for group, base in _scaling_groups(fixed):
        t1 = float(base["output_tokens_per_s"])
        for _, row in group.iterrows():
            speedup = float(row["output_tokens_per_s"]) / t1
            out.append({**{k: row[k] for k in SCALING_KEYS}, "world_size": row["world_size"], "run_id": row["run_id"],
                        "output_tokens_per_s": row["output_tokens_per_s"], "speedup": speedup,
                        "efficiency": speedup / row["world_size"]})
    return pd.DataFrame(out)


def weak_scaling_efficiency(t1: float, tn: float) -> float:
    """Weak-scaling efficiency: work grows with n, so the ideal is equal time: T(1)/T(n)."""
    return t1 / tn


def weak_scaling(runs: pd.DataFrame) -> pd.DataFrame:
    """Work (prompts) grows with the ranks: T(n) is the wall time of one pass over the run's prompts, and the
    efficiency T(1)/T(n); compared within one engine, batch size, precision and micro-batch count."""
    if runs.empty or "num_prompts" not in runs or runs["num_prompts"].isna().all():
        return pd.DataFrame()
    out = []
    for group, base in _scaling_groups(runs[runs["num_prompts"].notna()]):
        t1 = float(base["wall_s"]) / float(base["repeats"])
        for _, row in group.iterrows():
            tn = float(row["wall_s"]) / float(row["repeats"])
            out.append({**{k: row[k] for k in SCALING_KEYS}, "world_size": row["world_size"], "run_id": row["run_id"],
                        "prompts": int(row["num_prompts"]), "pass_s": tn,
                        "output_tokens_per_s": row["output_tokens_per_s"],
                        "efficiency": weak_scaling_efficiency(t1, tn)})
    return pd.DataFrame(out)


def batch_sweep(runs: pd.DataFrame) -> pd.DataFrame:
    """Throughput, latency and memory per batch size, for each engine and layout."""
    if runs.empty:
        return pd.DataFrame()
    cols = ["engine", "world_size", "microbatches", "precision", "batch_size", "output_tokens_per_s", "prompts_per_s",
            "ttft_p50_s", "tpot_p50_s", "e2e_p90_s", "peak_memory_bytes", "run_id"]
    return runs[[c for c in cols if c in runs]].sort_values(["engine", "world_size", "microbatches", "batch_size"])


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (None when equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def token_agreement(a: list[int], b: list[int]) -> float:
    """Share of positions where two completions agree, over the longer one (1.0 when equal)."""
    length = max(len(a), len(b))
    return 1.0 if length == 0 else sum(x == y for x, y in zip(a, b)) / length


def compare_completions(tokens: list[list[int]], ref_tokens: list[list[int]]) -> dict:
    """Exact-match rate, mean token agreement and the earliest first divergence over prompt pairs."""
    pairs = list(zip(tokens, ref_tokens))
    divergences = [d for d in (first_divergence(a, b) for a, b in pairs) if d is not None]
    return {"prompts": len(pairs),
            "exact_match_rate": (len(pairs) - len(divergences)) / len(pairs) if pairs else None,
            "token_agreement": sum(token_agreement(a, b) for a, b in pairs) / len(pairs) if pairs else None,
            "first_divergence_min": min(divergences) if divergences else None}


def _same(frame: pd.DataFrame, row: pd.Series, keys: list[str]) -> pd.Series:
    mask = pd.Series(True, index=frame.index)
    for key in keys:
        mask &= frame[key].isna() if pd.isna(row[key]) else frame[key] == row[key]
    return mask


def correctness(loaded: LoadedExperiment) -> pd.DataFrame:
    """Each run against the reference of the same batch size, precision and context: exact-match rate, token
    agreement, first divergence (fp32 greedy runs must match exactly)."""
    runs = loaded.runs
    if runs.empty:
        return pd.DataFrame()
    out = []
    refs = runs[runs["engine"] == "reference"]
    for _, row in runs[runs["engine"] != "reference"].iterrows():
        ref = refs[_same(refs, row, ["batch_size", "precision", "context_tokens"])]
        if ref.empty:
            continue
        ref_id = ref.sort_values("num_prompts", na_position="first")["run_id"].iloc[-1]
        out.append({"run_id": row["run_id"], "reference": ref_id, "precision": row["precision"],
                    **compare_completions(loaded.completions.get(row["run_id"], []), loaded.completions.get(ref_id, []))})
    return pd.DataFrame(out)


def precision_tradeoff(loaded: LoadedExperiment, baseline: str | None = None) -> pd.DataFrame:
    """Every precision against the baseline precision's reference (float32, else float16): throughput, memory,
    token agreement with the baseline's completions, and perplexity (from each precision's reference run)."""
    runs = loaded.runs
    if runs.empty or runs["precision"].nunique() < 2:
        return pd.DataFrame()
    present = set(runs["precision"])
    baseline = baseline or next((p for p in ("float32", "float16", "bfloat16") if p in present), None)
    refs = runs[runs["engine"] == "reference"]
    out = []
    for _, row in runs.iterrows():
        base = refs[(refs["precision"] == baseline) & _same(refs, row, ["batch_size", "context_tokens"])]
        own_ref = refs[_same(refs, row, ["batch_size", "precision", "context_tokens"])]
        if base.empty:
            continue
        base_row = base.iloc[0]
        ppl = own_ref["perplexity"].iloc[0] if not own_ref.empty else None
        out.append({"run_id": row["run_id"], "engine": row["engine"], "world_size": row["world_size"],
                    "batch_size": row["batch_size"], "precision": row["precision"], "baseline": base_row["run_id"],
                    "output_tokens_per_s": row["output_tokens_per_s"],
                    "speedup_vs_baseline": row["output_tokens_per_s"] / base_row["output_tokens_per_s"]
                    if base_row["engine"] == row["engine"] else None,
                    "peak_memory_bytes": row["peak_memory_bytes"],
                    **{k: v for k, v in compare_completions(loaded.completions.get(row["run_id"], []),
                                                            loaded.completions.get(base_row["run_id"], [])).items()
                       if k in ("token_agreement", "exact_match_rate")},
                    "perplexity": ppl, "baseline_perplexity": base_row["perplexity"],
                    "perplexity_change": (ppl / base_row["perplexity"] - 1) if ppl and base_row["perplexity"] else None})
    return pd.DataFrame(out)


def optimization(runs: pd.DataFrame, axis: str | None) -> pd.DataFrame:
    """One change against the baseline: the swept field's first value is the baseline; speedup of the others."""
    if runs.empty or axis is None or axis not in runs:
        return pd.DataFrame()
    subject = runs[runs["engine"] != "reference"] if axis != "engine" else runs
    values = list(dict.fromkeys(subject[axis]))
    if len(values) < 2:
        return pd.DataFrame()
    base = subject[subject[axis] == values[0]]
    t0 = float(base["output_tokens_per_s"].iloc[0])
    return pd.DataFrame([{"run_id": r["run_id"], axis: r[axis], "baseline": base["run_id"].iloc[0],
                          "output_tokens_per_s": r["output_tokens_per_s"], "tpot_p50_s": r["tpot_p50_s"],
                          "speedup_vs_baseline": r["output_tokens_per_s"] / t0} for _, r in subject.iterrows()])


def time_breakdown(ranks: pd.DataFrame) -> pd.DataFrame:
    """Per rank: seconds of compute, communication (sends) and waiting (blocked receives), and their shares."""
    if ranks.empty:
        return pd.DataFrame()
    out = ranks.copy()
    total = out[["compute_s", "comm_s", "wait_s"]].sum(axis=1)
    for col in ("compute_s", "comm_s", "wait_s"):
        out[col.replace("_s", "_share")] = out[col] / total.where(total > 0)
    return out
