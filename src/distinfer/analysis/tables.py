"""Derived tables: scaling, batch sweep, correctness against the reference, per-rank time split."""

from __future__ import annotations

import pandas as pd

from distinfer.analysis.bundles import LoadedExperiment
from distinfer.engines import REFERENCE

SCALING_KEYS = ["engine", "batch_size", "precision", "microbatches", "tp", "ep"]
LAYOUT_DEFAULTS = {"tp": 1, "ep": 1, "layout": "1"}  # runs recorded without the split axes: one rank per stage


def with_layout_columns(runs: pd.DataFrame) -> pd.DataFrame:
    """`runs` with the split axes (tp, ep, layout) present; absent ones take their one-rank-per-stage values."""
    missing = {k: v for k, v in LAYOUT_DEFAULTS.items() if k not in runs}
    return runs.assign(**missing) if missing else runs


def _with_baseline(runs: pd.DataFrame, value: str) -> pd.DataFrame:
    """Non-reference runs of groups (SCALING_KEYS) with two runs or more and a one-rank run, each with that
    group's one-rank `value` as `base`; sorted by group and rank count."""
    subject = with_layout_columns(runs[runs["engine"] != REFERENCE])
    if subject.empty:
        return subject.assign(base=pd.Series(dtype=float))
    sizes = subject.groupby(SCALING_KEYS, dropna=False)["run_id"].transform("size")
    base = (subject[subject["world_size"] == 1].drop_duplicates(SCALING_KEYS)[SCALING_KEYS + [value]]
            .rename(columns={value: "base"}))
    return subject[sizes >= 2].merge(base, on=SCALING_KEYS).sort_values(SCALING_KEYS + ["world_size"], kind="stable")


def strong_scaling(runs: pd.DataFrame) -> pd.DataFrame:
    """Fixed work, more ranks: speedup S(n) = T(1)/T(n) = throughput(n)/throughput(1), efficiency S(n)/n.

    Compared within one engine, batch size, precision and micro-batch count; the baseline is that group's
    one-rank run. Weak-scaling runs (prompts growing with n) are left out.
    """
    if runs.empty:
        return pd.DataFrame()
    fixed = runs[runs["num_prompts"].isna()] if "num_prompts" in runs else runs
    table = _with_baseline(fixed, "output_tokens_per_s")
    if table.empty:
        return pd.DataFrame()
    speedup = table["output_tokens_per_s"] / table["base"]
    return pd.DataFrame({**{k: table[k] for k in SCALING_KEYS}, "world_size": table["world_size"],
                         "run_id": table["run_id"], "output_tokens_per_s": table["output_tokens_per_s"],
                         "speedup": speedup, "efficiency": speedup / table["world_size"]}).reset_index(drop=True)


def weak_scaling_efficiency(t1: float, tn: float) -> float:
    """Weak-scaling efficiency: work grows with n, so the ideal is equal time: T(1)/T(n)."""
    return t1 / tn


def weak_scaling(runs: pd.DataFrame) -> pd.DataFrame:
    """Work (prompts) grows with the ranks: T(n) is the wall time of one pass over the run's prompts, and the
    efficiency T(1)/T(n); compared within one engine, batch size, precision and micro-batch count."""
    if runs.empty or "num_prompts" not in runs or runs["num_prompts"].isna().all():
        return pd.DataFrame()
    grown = runs[runs["num_prompts"].notna()]
    table = _with_baseline(grown.assign(pass_s=grown["wall_s"] / grown["repeats"]), "pass_s")
    if table.empty:
        return pd.DataFrame()
    return pd.DataFrame({**{k: table[k] for k in SCALING_KEYS}, "world_size": table["world_size"],
                         "run_id": table["run_id"], "prompts": table["num_prompts"].astype(int),
                         "pass_s": table["pass_s"], "output_tokens_per_s": table["output_tokens_per_s"],
                         "efficiency": weak_scaling_efficiency(table["base"], table["pass_s"])}).reset_index(drop=True)


def batch_sweep(runs: pd.DataFrame) -> pd.DataFrame:
    """Throughput, latency and memory per batch size, for each engine and layout."""
    if runs.empty:
        return pd.DataFrame()
    cols = ["engine", "world_size", "layout", "microbatches", "precision", "batch_size", "output_tokens_per_s", "prompts_per_s",
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
    different = [(a, b) for a, b in pairs if a != b]  # equal lists compare in C; most runs are all equal
    divergences = [d for d in (first_divergence(a, b) for a, b in different) if d is not None]
    agreement = len(pairs) - len(different) + sum(token_agreement(a, b) for a, b in different)
    return {"prompts": len(pairs),
            "exact_match_rate": (len(pairs) - len(divergences)) / len(pairs) if pairs else None,
            "token_agreement": agreement / len(pairs) if pairs else None,
            "first_divergence_min": min(divergences) if divergences else None}


def _reference_per_key(refs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One reference run per combination of `keys`: the one over the most prompts (a weak-scaling study's
    reference covers every run's prompts)."""
    ordered = refs.sort_values("num_prompts", na_position="first") if "num_prompts" in refs else refs
    return ordered.drop_duplicates(keys, keep="last")


def _match_reference(runs: pd.DataFrame, refs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Each run with the run_id (and columns) of its reference of the same `keys` (NaN matches NaN)."""
    chosen = _reference_per_key(refs, keys)[keys + ["run_id", "perplexity", "output_tokens_per_s", "engine"]]
    return runs.merge(chosen.rename(columns={"run_id": "reference", "perplexity": "reference_perplexity",
                                             "output_tokens_per_s": "reference_tokens_per_s",
                                             "engine": "reference_engine"}), on=keys, how="inner")


SAMPLED_NOTE = "sampled: every engine draws with the same seeded per-prompt generators; equal in fp32"


def correctness(loaded: LoadedExperiment) -> pd.DataFrame:
    """Each run against the reference of the same batch size, precision and context: exact-match rate, token
    agreement, first divergence (fp32 greedy runs must match exactly). Sampled runs are compared too (every
    engine draws with the same seeded generators) and marked in `sampling`."""
    runs = loaded.runs
    if runs.empty:
        return pd.DataFrame()
    keys = ["batch_size", "precision", "context_tokens"]
    matched = _match_reference(runs[runs["engine"] != REFERENCE], runs[runs["engine"] == REFERENCE], keys)
    out = []
    for run_id, reference, precision, sampling in zip(matched["run_id"], matched["reference"], matched["precision"],
                                                      matched.get("sampling", pd.Series("greedy", matched.index))):
        out.append({"run_id": run_id, "reference": reference, "precision": precision,
                    "sampling": sampling if isinstance(sampling, str) else "greedy",
                    **compare_completions(loaded.completions.get(run_id, []), loaded.completions.get(reference, []))})
    return pd.DataFrame(out)


def precision_tradeoff(loaded: LoadedExperiment, baseline: str | None = None) -> pd.DataFrame:
    """Every precision against the baseline precision's reference (float32, else float16): throughput, memory,
    token agreement with the baseline's completions, and perplexity (from each precision's reference run)."""
    runs = loaded.runs
    if runs.empty or runs["precision"].nunique() < 2:
        return pd.DataFrame()
    present = set(runs["precision"])
    baseline = baseline or next((p for p in ("float32", "float16", "bfloat16") if p in present), None)
    refs = runs[runs["engine"] == REFERENCE]
    own = _match_reference(runs, refs, ["batch_size", "precision", "context_tokens"])[["run_id", "reference_perplexity"]]
    base = _match_reference(runs, refs[refs["precision"] == baseline], ["batch_size", "context_tokens"])
    base = base.merge(own, on="run_id", how="left", suffixes=("_baseline", ""))
    out = []
    for row in base.to_dict("records"):
        ppl, base_ppl = row["reference_perplexity"], row["reference_perplexity_baseline"]
        ppl = None if pd.isna(ppl) else ppl
        base_ppl = None if pd.isna(base_ppl) else base_ppl
        agreement = compare_completions(loaded.completions.get(row["run_id"], []),
                                        loaded.completions.get(row["reference"], []))
        out.append({"run_id": row["run_id"], "engine": row["engine"], "world_size": row["world_size"],
                    "batch_size": row["batch_size"], "precision": row["precision"], "baseline": row["reference"],
                    "output_tokens_per_s": row["output_tokens_per_s"],
                    "speedup_vs_baseline": row["output_tokens_per_s"] / row["reference_tokens_per_s"]
                    if row["reference_engine"] == row["engine"] else None,
                    "peak_memory_bytes": row["peak_memory_bytes"],
                    "token_agreement": agreement["token_agreement"], "exact_match_rate": agreement["exact_match_rate"],
                    "perplexity": ppl, "baseline_perplexity": base_ppl,
                    "perplexity_change": (ppl / base_ppl - 1) if ppl and base_ppl else None})
    return pd.DataFrame(out)


def optimization(runs: pd.DataFrame, axis: str | None) -> pd.DataFrame:
    """One change against the baseline: the swept field's first value is the baseline; speedup of the others."""
    if runs.empty or axis is None or axis not in runs:
        return pd.DataFrame()
    subject = runs[runs["engine"] != REFERENCE] if axis != "engine" else runs
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


def experts(ranks: pd.DataFrame) -> pd.DataFrame:
    """Mixture-of-experts runs with expert parallelism: tokens each expert processed (per stage, summed over the
    stage's MoE layers: expert e of every layer), its share of
    the stage's, the stage's balance (busiest expert / mean), and the run's share of compute time spent in the
    routing collectives (all-to-all and the all-gather after it)."""
    if ranks.empty or "expert_tokens" not in ranks or ranks["expert_tokens"].isna().all():
        return pd.DataFrame()
    moe = ranks[ranks["expert_tokens"].notna()]
    rows = [{"run_id": r.run_id, "stage": r.stage, "rank": r.rank, "expert": int(e), "tokens": n}
            for r in moe.itertuples() for e, n in r.expert_tokens.items()]
    table = pd.DataFrame(rows).astype({"stage": "Int64"})
    stage = table.groupby(["run_id", "stage"])["tokens"]
    table["share_of_stage"] = table["tokens"] / stage.transform("sum")
    table["stage_balance"] = stage.transform("max") / stage.transform("mean")
    run = moe.groupby("run_id")[["all_to_all_s", "compute_s"]].sum()
    table["all_to_all_share"] = table["run_id"].map(run["all_to_all_s"] / run["compute_s"].where(run["compute_s"] > 0))
    return table.sort_values(["run_id", "stage", "expert"]).reset_index(drop=True)


SERVING_LAYOUT = ["engine", "served_model", "world_size", "microbatches", "load"]
KNEE_ATTAINMENT = 0.9  # a load "meets the SLOs" when at least this share of its requests met every one


def load_numbers(values: pd.Series) -> pd.Series:
    """A serving load column ("4", "0.5", "inf", user counts) as numbers, inf for "inf"."""
    return pd.to_numeric(values.replace("inf", float("inf")), errors="coerce")


def serving(runs: pd.DataFrame) -> pd.DataFrame:
    """Serving runs: per layout and load, offered and achieved request rate, throughput, goodput, latency."""
    if runs.empty or "scenario" not in runs or not (runs["scenario"] == "serving").any():
        return pd.DataFrame()
    subject = runs[runs["scenario"] == "serving"]
    cols = [*SERVING_LAYOUT, "load_value", "offered_rate", "achieved_rate", "request_throughput", "output_tokens_per_s",
            "goodput", "slo_attained", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "itl_p99_s",
            "e2e_p99_s", "ttft_intended_p99_s", "send_lag_p99_s", "valid", "invalid_reasons", "peak_concurrency",
            "errors", "prefix_cache_hit_rate", "run_id",
            *sorted(c for c in subject if c.startswith("slo_") and c.endswith("_s"))]
    table = subject[[c for c in cols if c in subject]].copy()
    if "prefix_cache_hit_rate" in table and table["prefix_cache_hit_rate"].isna().all():
        table = table.drop(columns="prefix_cache_hit_rate")  # no target of the study counts its prefix cache
    table["order"] = load_numbers(table["load_value"])
    return table.sort_values([c for c in SERVING_LAYOUT if c in table] + ["order"]).drop(columns="order")


def serving_knee(table: pd.DataFrame) -> pd.DataFrame:
    """Per layout, the highest valid load (request rate, or users; a load the client did not deliver as asked never
    counts) at which at least KNEE_ATTAINMENT of the requests met every SLO, and the goodput there; none where no
    load did (or no SLO was set)."""
    if table.empty or "slo_attained" not in table or table["slo_attained"].isna().all():
        return pd.DataFrame()
    out = []
    keys = [c for c in SERVING_LAYOUT if c in table]
    for key, group in table.groupby(keys, dropna=False):
        valid = group["valid"].fillna(True).astype(bool).to_numpy() if "valid" in group else True
        meeting = group[(group["slo_attained"] >= KNEE_ATTAINMENT).to_numpy() & valid]  # never an invalid load
        best = meeting.loc[load_numbers(meeting["load_value"]).idxmax()] if not meeting.empty else None
        out.append({**dict(zip(keys, key if isinstance(key, tuple) else (key,))), "loads_measured": len(group),
                    "loads_invalid": int((~valid).sum()) if "valid" in group else 0,
                    "highest_load_meeting_slo": None if best is None else best["load_value"],
                    **{c: None if best is None else best[c]
                       for c in ("achieved_rate", "goodput", "ttft_p99_s", "tpot_p99_s")}})
    return pd.DataFrame(out)
