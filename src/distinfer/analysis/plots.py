"""Plots a reader understands without the code: labelled axes with units, legends, titled with model and hardware."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["svg.fonttype"] = "none"  # keep text as text: searchable, and testable
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

FORMATS = ("png", "svg")


def _save(fig: plt.Figure, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in FORMATS:
        path = out / f"{name}.{fmt}"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def strong_scaling_plot(table: pd.DataFrame, subject: str, out: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, group in table.groupby(["engine", "batch_size", "microbatches"]):
        ax.plot(group["world_size"], group["speedup"], marker="o", label=f"{key[0]}, batch {key[1]}, mb {key[2]}")
    n = sorted(table["world_size"].unique())
    ax.plot(n, n, linestyle="--", color="grey", label="ideal (S = n)")
    ax.set_xlabel("ranks (pipeline stages / TP ranks)")
    ax.set_ylabel("speedup S(n) = T(1) / T(n)")
    ax.set_xticks(n)
    ax.set_title(f"Strong scaling: {subject}")
    ax.legend(fontsize=8)
    return _save(fig, out, "strong_scaling")


def batch_sweep_plot(table: pd.DataFrame, subject: str, out: Path) -> list[Path]:
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for key, group in table.groupby(["engine", "world_size", "microbatches"]):
        label = f"{key[0]}, {key[1]} rank(s), mb {key[2]}"
        group = group.sort_values("batch_size")
        axes[0].plot(group["batch_size"], group["output_tokens_per_s"], marker="o", label=label)
        axes[1].plot(group["batch_size"], group["tpot_p50_s"] * 1000, marker="o", label=label)
        axes[2].plot(group["batch_size"], group["peak_memory_bytes"] / 2**20, marker="o", label=label)
    for ax, ylabel in zip(axes, ("output throughput (tokens/s)", "TPOT p50 (ms)", "peak memory per rank (MiB)")):
        ax.set_xticks(sorted(table["batch_size"].unique()))
        ax.set_xlabel("batch size (prompts)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(f"Batch sweep: {subject}")
    return _save(fig, out, "batch_sweep")


def time_breakdown_plot(table: pd.DataFrame, subject: str, out: Path) -> list[Path]:
    labels = [f"{r.run_id}\nrank {r.rank}" for r in table.itertuples()]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(labels)), 4.5))
    bottom = pd.Series(0.0, index=table.index)
    for col, name in (("compute_s", "compute"), ("comm_s", "communication (send)"), ("wait_s", "waiting (receive)")):
        ax.bar(labels, table[col], bottom=bottom, label=name)
        bottom = bottom + table[col]
    ax.set_ylabel("time per rank over the measured batches (s)")
    ax.set_xlabel("run and rank")
    ax.set_title(f"Where each rank's time goes: {subject}")
    ax.tick_params(axis="x", labelsize=6, rotation=90)
    ax.legend(fontsize=8)
    return _save(fig, out, "time_breakdown")


def latency_plot(runs: pd.DataFrame, subject: str, out: Path) -> list[Path]:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(runs))
    for ax, metric, title in ((axes[0], "ttft", "time to first token"), (axes[1], "tpot", "time per output token")):
        for offset, stat in zip((-0.25, 0.0, 0.25), ("p50", "p90", "p99")):
            ax.bar([i + offset for i in x], runs[f"{metric}_{stat}_s"] * 1000, width=0.25, label=stat)
        ax.set_xticks(list(x))
        ax.set_xticklabels(runs["run_id"], rotation=90, fontsize=6)
        ax.set_ylabel(f"{metric.upper()} (ms)")
        ax.set_xlabel("run")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"Latency distribution: {subject}")
    return _save(fig, out, "latency")


def weak_scaling_plot(table: pd.DataFrame, subject: str, out: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, group in table.groupby(["engine", "batch_size", "microbatches"]):
        ax.plot(group["world_size"], group["efficiency"], marker="o", label=f"{key[0]}, batch {key[1]}, mb {key[2]}")
    n = sorted(table["world_size"].unique())
    ax.axhline(1.0, linestyle="--", color="grey", label="ideal (E = 1: equal time for n x the work)")
    ax.set_xlabel("ranks n (prompts grow with n)")
    ax.set_ylabel("weak-scaling efficiency E(n) = T(1) / T(n)")
    ax.set_xticks(n)
    ax.set_ylim(0, max(1.1, float(table["efficiency"].max()) * 1.1))
    ax.set_title(f"Weak scaling: {subject}")
    ax.legend(fontsize=8)
    return _save(fig, out, "weak_scaling")


def precision_plot(table: pd.DataFrame, subject: str, out: Path) -> list[Path]:
    """Throughput against agreement with the baseline precision: the quantization trade-off at a glance."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for precision, group in table.groupby("precision"):
        ax.scatter(group["token_agreement"] * 100, group["output_tokens_per_s"], s=40, label=str(precision))
        for row in group.itertuples():
            ax.annotate(f"{row.engine} n={row.world_size} b={row.batch_size}", (row.token_agreement * 100,
                        row.output_tokens_per_s), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("token agreement with the baseline precision's reference (%)")
    ax.set_ylabel("output throughput (tokens/s)")
    ax.set_xlim(0, 105)
    ax.set_title(f"Precision and quantization: {subject}")
    ax.legend(title="precision", fontsize=8)
    return _save(fig, out, "precision")
