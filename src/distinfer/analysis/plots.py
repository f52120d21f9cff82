"""Plots a reader understands without the code: labelled axes with units, legends, titled with model and hardware.

Runs of the same layout (repeats, or a year of sweeps in one folder) are drawn as one point, their median,
so a plot's size follows the layouts compared, not the bundles; per-layout plots show at most
MAX_LAYOUTS layouts (the fastest) and say so.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["svg.fonttype"] = "none"  # keep text as text: searchable, and testable
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from distinfer.analysis.tables import SERVING_LAYOUT, with_layout_columns  # noqa: E402
from distinfer.engines import capabilities  # noqa: E402

FORMATS = ("png", "svg")
LAYOUT = ["engine", "world_size", "layout", "microbatches", "batch_size", "precision"]  # runs of the same layout
MAX_LAYOUTS = 24
MAX_LINES = 10  # lines with a legend entry each; more share one colour per engine


def _save(fig: plt.Figure, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in FORMATS:
        path = out / f"{name}.{fmt}"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def by_layout(table: pd.DataFrame, keys: list[str], values: list[str]) -> pd.DataFrame:
    """The median of `values` per combination of `keys` (missing keys ignored), with the runs counted."""
    keys = [k for k in keys if k in table]
    grouped = table.groupby(keys, dropna=False)
    out = grouped[[v for v in values if v in table]].median()
    out["runs"] = grouped.size()
    return out.reset_index()


def _lines(ax: plt.Axes, table: pd.DataFrame, series: list[str], x: str, y: str, label) -> None:  # noqa: ANN001
    """One line per series (median over repeats at each x); past MAX_LINES one colour per engine, no legend each."""
    groups = list(by_layout(table, series + [x], [y]).groupby(series, dropna=False))
    many = len(groups) > MAX_LINES
    colours: dict[object, str] = {}
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        group = group.sort_values(x)
        if many:
            first = key[0] not in colours
            colour = colours.setdefault(key[0], f"C{len(colours)}")
            ax.plot(group[x], group[y], marker=".", color=colour, alpha=0.5, linewidth=0.8,
                    label=f"{key[0]} (one line per layout)" if first else None)
        else:
            ax.plot(group[x], group[y], marker="o", label=label(key))


def strong_scaling_plot(table: pd.DataFrame, subject: str, out: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(6, 4))
    _lines(ax, table, ["engine", "batch_size", "microbatches", "precision"], "world_size", "speedup",
           lambda k: f"{k[0]}, batch {k[1]}, mb {k[2]}, {k[3]}")
    n = sorted(table["world_size"].unique())
    ax.plot(n, n, linestyle="--", color="grey", label="ideal (S = n)")
    ax.set_xlabel("ranks (pipeline stages / TP ranks)")
    ax.set_ylabel("speedup S(n) = T(1) / T(n)")
    ax.set_xticks(n)
    ax.set_title(f"Strong scaling: {subject}")
    ax.legend(fontsize=8)
    return _save(fig, out, "strong_scaling")


def batch_sweep_applies(table: pd.DataFrame) -> bool:
    """A batch sweep plot needs a layout measured at two batch sizes or more."""
    if table.empty:
        return False
    keys = [k for k in ("engine", "world_size", "microbatches", "precision") if k in table]
    return bool((table.groupby(keys, dropna=False)["batch_size"].nunique() >= 2).any())


def batch_sweep_plot(table: pd.DataFrame, subject: str, out: Path) -> list[Path]:
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    keys = ["engine", "world_size", "microbatches", "precision"]
    swept = table.groupby(keys, dropna=False)["batch_size"].transform("nunique") >= 2
    table = table[swept]
    for ax, column, scale, ylabel in ((axes[0], "output_tokens_per_s", 1, "output throughput (tokens/s)"),
                                      (axes[1], "tpot_p50_s", 1000, "TPOT p50 (ms)"),
                                      (axes[2], "peak_memory_bytes", 2**-20, "peak memory per rank (MiB)")):
        scaled = table.assign(value=table[column] * scale)
        _lines(ax, scaled, keys, "batch_size", "value", lambda k: f"{k[0]}, {k[1]} rank(s), mb {k[2]}, {k[3]}")
        ax.set_xticks(sorted(table["batch_size"].unique()))
        ax.set_xlabel("batch size (prompts)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(f"Batch sweep: {subject}")
    return _save(fig, out, "batch_sweep")


def _layout_label(row: pd.Series) -> str:
    split = f" {row['layout']}" if row.get("layout") and "x" in str(row.get("layout")) else ""
    label = f"{row['engine']} n={row['world_size']}{split} b={row['batch_size']}"
    if row.get("microbatches", 1) not in (1, None) and not pd.isna(row.get("microbatches")):
        label += f" mb={int(row['microbatches'])}"
    return f"{label} {row['precision']}"


def _top_layouts(runs: pd.DataFrame, values: list[str]) -> tuple[pd.DataFrame, str]:
    """Per layout medians, the MAX_LAYOUTS fastest, and a note when some were left out."""
    layouts = by_layout(with_layout_columns(runs), LAYOUT, ["output_tokens_per_s", *values])
    note = ""
    if len(layouts) > MAX_LAYOUTS:
        note = f" ({MAX_LAYOUTS} fastest of {len(layouts)} layouts)"
        layouts = layouts.nlargest(MAX_LAYOUTS, "output_tokens_per_s")
    return layouts.sort_values(LAYOUT[:3] + ["batch_size"]).reset_index(drop=True), note


def time_breakdown_plot(runs: pd.DataFrame, ranks: pd.DataFrame, subject: str, out: Path) -> list[Path]:
    """Per layout and rank, the median seconds of compute, communication and waiting."""
    runs = with_layout_columns(runs)
    keyed = ranks.merge(runs[["run_id", *LAYOUT, "output_tokens_per_s"]], on="run_id")
    layouts, note = _top_layouts(runs, [])
    keyed = keyed.merge(layouts[LAYOUT], on=LAYOUT)
    table = by_layout(keyed, LAYOUT + ["rank"], ["compute_s", "comm_s", "wait_s"])
    labels = [f"{_layout_label(r)}\nrank {int(r['rank'])}" for _, r in table.iterrows()]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(labels)), 4.5))
    bottom = pd.Series(0.0, index=table.index)
    for col, name in (("compute_s", "compute"), ("comm_s", "communication (send)"), ("wait_s", "waiting (receive)")):
        ax.bar(labels, table[col], bottom=bottom, label=name)
        bottom = bottom + table[col]
    ax.set_ylabel("time per rank over the measured batches (s)")
    ax.set_xlabel("layout and rank (median over its runs)")
    ax.set_title(f"Where each rank's time goes: {subject}{note}")
    ax.tick_params(axis="x", labelsize=6, rotation=90)
    ax.legend(fontsize=8)
    return _save(fig, out, "time_breakdown")


def latency_plot(runs: pd.DataFrame, subject: str, out: Path) -> list[Path]:
    stats = [f"{m}_{s}_s" for m in ("ttft", "tpot") for s in ("p50", "p90", "p99")]
    layouts, note = _top_layouts(runs, stats)
    fig, axes = plt.subplots(1, 2, figsize=(max(12, 0.5 * len(layouts)), 4.5))
    x = range(len(layouts))
    for ax, metric, title in ((axes[0], "ttft", "time to first token"), (axes[1], "tpot", "time per output token")):
        for offset, stat in zip((-0.25, 0.0, 0.25), ("p50", "p90", "p99")):
            ax.bar([i + offset for i in x], layouts[f"{metric}_{stat}_s"] * 1000, width=0.25, label=stat)
        ax.set_xticks(list(x))
        ax.set_xticklabels([_layout_label(r) for _, r in layouts.iterrows()], rotation=90, fontsize=6)
        ax.set_ylabel(f"{metric.upper()} (ms)")
        ax.set_xlabel("layout (median over its runs)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"Latency distribution: {subject}{note}")
    return _save(fig, out, "latency")


def weak_scaling_plot(table: pd.DataFrame, subject: str, out: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(6, 4))
    _lines(ax, table, ["engine", "batch_size", "microbatches", "precision"], "world_size", "efficiency",
           lambda k: f"{k[0]}, batch {k[1]}, mb {k[2]}, {k[3]}")
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
    """Throughput against agreement with the baseline precision: the quantization trade-off at a glance. One
    marker per precision, one colour per engine and rank count; the x axis spans the agreement measured."""
    points = by_layout(table, ["precision", "engine", "world_size", "batch_size"],
                       ["token_agreement", "output_tokens_per_s"]).dropna(subset=["token_agreement"])
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = dict(zip(sorted(points["precision"].unique()), "osD^vP*X"))
    colours: dict[tuple, str] = {}
    for _, row in points.iterrows():
        layout = (row["engine"], row["world_size"])
        colour = colours.setdefault(layout, f"C{len(colours)}")
        ax.scatter(row["token_agreement"] * 100, row["output_tokens_per_s"], s=50, marker=markers[row["precision"]],
                   color=colour, edgecolors="black", linewidths=0.4)
    for precision, marker in markers.items():
        ax.scatter([], [], marker=marker, color="grey", label=str(precision))
    for (engine, world), colour in colours.items():
        ax.scatter([], [], marker="s", color=colour, label=f"{engine}, {world} rank(s)")
    low = float(points["token_agreement"].min() * 100) if not points.empty else 0.0
    span = max(2.0, 100 - low)
    ax.set_xlim(max(0.0, low - 0.1 * span), 100 + 0.1 * span)
    ax.set_xlabel("token agreement with the baseline precision's reference (%)")
    ax.set_ylabel("output throughput (tokens/s)")
    ax.set_title(f"Precision and quantization: {subject}")
    ax.legend(fontsize=7, loc="best")
    return _save(fig, out, "precision")


def _serving_label(key: tuple) -> str:
    engine, model, world, microbatches, load = key
    what = f"{model}" if capabilities(engine).program == "endpoint" else f"{engine} n={world} mb={microbatches}"
    return f"{what} ({'closed loop' if load == 'concurrency' else 'open loop'})"


def _invalid(table: pd.DataFrame) -> pd.DataFrame:
    """The loads the client did not deliver as asked (summary `valid` false): drawn apart, never joined in."""
    return table[table["valid"].eq(False)] if "valid" in table else table.iloc[0:0]


def latency_throughput_plot(table: pd.DataFrame, subject: str, out: Path) -> list[Path]:
    """TTFT and TPOT (p50 solid, p99 dashed) against the request throughput (requests completed per second),
    one colour per layout; the SLO, where one was set, as a grey line."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for index, (key, group) in enumerate(table.groupby(SERVING_LAYOUT, dropna=False)):
        group = group.sort_values("request_throughput")
        for ax, metric in zip(axes, ("ttft", "tpot")):
            for stat, style in (("p50", "-"), ("p99", "--")):
                ax.plot(group["request_throughput"], group[f"{metric}_{stat}_s"] * 1000, style, marker="o",
                        color=f"C{index}", label=f"{_serving_label(key)} {stat}")
    invalid = _invalid(table)
    for ax, metric, title in ((axes[0], "ttft", "time to first token"), (axes[1], "tpot", "time per output token")):
        if not invalid.empty:
            ax.scatter(invalid["request_throughput"], invalid[f"{metric}_p99_s"] * 1000, marker="x", s=80,
                       color="red", zorder=5, label="invalid load (the client did not deliver it)")
        column = f"slo_{metric}_s"
        if column in table and table[column].notna().any():
            ax.axhline(float(table[column].dropna().iloc[0]) * 1000, color="grey", linestyle=":", label="SLO")
        ax.set_xlabel("request throughput (requests completed/s)")
        ax.set_ylabel(f"{metric.upper()} (ms)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(f"Latency against throughput: {subject}")
    return _save(fig, out, "latency_throughput")


def goodput_plot(table: pd.DataFrame, subject: str, out: Path) -> list[Path]:
    """Goodput (requests/s meeting every SLO) and request throughput against the offered rate; `inf` (all at
    once) is drawn right of the highest finite rate."""
    rates = table[table["load"] == "rate"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    finite = rates["offered_rate"][rates["offered_rate"] != float("inf")]
    inf_at = float(finite.max()) * 1.5 if not finite.empty else 1.0
    for index, (key, group) in enumerate(rates.groupby(SERVING_LAYOUT, dropna=False)):
        x = group["offered_rate"].replace(float("inf"), inf_at)
        order = x.argsort()
        ax.plot(x.iloc[order], group["goodput"].iloc[order], marker="o", color=f"C{index}",
                label=f"{_serving_label(key)} goodput")
        ax.plot(x.iloc[order], group["request_throughput"].iloc[order], linestyle="--", marker=".", color=f"C{index}",
                label=f"{_serving_label(key)} all requests")
    slo = ", ".join(f"{c.removeprefix('slo_').removesuffix('_s').upper()} ≤ {float(table[c].dropna().iloc[0]) * 1000:g} ms"
                    for c in table if c.startswith("slo_") and c.endswith("_s") and table[c].notna().any())
    ticks = sorted(set(finite.tolist())) + ([inf_at] if (rates["offered_rate"] == float("inf")).any() else [])
    ax.set_xticks(ticks)
    ax.set_xticklabels(["inf" if t == inf_at and (rates["offered_rate"] == float("inf")).any() else f"{t:g}"
                        for t in ticks])
    invalid = _invalid(rates)
    if not invalid.empty:
        ax.scatter(invalid["offered_rate"].replace(float("inf"), inf_at), invalid["goodput"], marker="x", s=80,
                   color="red", zorder=5, label="invalid load (the client did not deliver it)")
    ax.set_xlabel("offered request rate (requests/s)")
    ax.set_ylabel("requests/s")
    ax.set_title(f"Goodput ({slo or 'no SLO set'}): {subject}", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, out, "goodput")


def prediction_plot(table: pd.DataFrame, subject: str, out: Path) -> list[Path]:
    """Predicted against measured, one panel per metric, log-log: on the diagonal a run went as the model said;
    runs outside the 20 % band are named."""
    metrics = [m for m in ("tokens_per_s", "tpot", "ttft") if (table["metric"] == m).any()]
    labels = {"tokens_per_s": "output tokens/s", "tpot": "TPOT p50 (s)", "ttft": "TTFT mean (s)"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        rows = table[table["metric"] == metric]
        for calibrated, marker, name in ((True, "s", "calibrated on"), (False, "o", "predicted")):
            part = rows[rows["calibrated_on"] == calibrated]
            if not part.empty:
                ax.scatter(part["measured"], part["predicted"], marker=marker, s=22, label=name)
        low = float(min(rows["measured"].min(), rows["predicted"].min())) * 0.8
        high = float(max(rows["measured"].max(), rows["predicted"].max())) * 1.25
        ax.plot([low, high], [low, high], color="grey", linewidth=1)
        ax.fill_between([low, high], [low * 0.8, high * 0.8], [low * 1.2, high * 1.2], color="grey", alpha=0.12,
                        label="within 20 %")
        for _, row in rows[rows["error"].abs() > 0.2].head(8).iterrows():
            ax.annotate(f"{row['run_id']} {row['error']:+.0%}", (row["measured"], row["predicted"]), fontsize=6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"measured {labels[metric]}")
        ax.set_ylabel(f"predicted {labels[metric]}")
        ax.legend(fontsize=7)
    fig.suptitle(f"Predicted against measured: {subject}")
    return _save(fig, out, "prediction")


def workload_plot(requests: pd.DataFrame, table: pd.DataFrame, subject: str, out: Path) -> list[Path]:
    """Left, middle: histograms of the prompt and output tokens the servers reported (filled) beside those the
    workload planned (outline), all runs together; right: TTFT p50 by session turn or by prefix group, a line per
    run, where the workload has them."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, sent, planned, what in ((axes[0], "prompt_tokens", "planned_input_tokens", "prompt tokens"),
                                    (axes[1], "output_tokens", "planned_output_tokens", "output tokens")):
        ax.hist(requests[sent].dropna(), bins=30, alpha=0.6, label="reported by the server")
        if requests[planned].notna().any():
            ax.hist(requests[planned].dropna(), bins=30, histtype="step", color="black", label="planned")
        ax.set_xlabel(what)
        ax.set_ylabel("requests")
        ax.legend(fontsize=7)
    sliced = table[table["by"] != "all"] if not table.empty else table
    for run_id, part in sliced.groupby("run_id", sort=False):
        axes[2].plot(part["key"], part["ttft_p50_s"] * 1000, marker="o", label=f"{run_id} (by {part['by'].iloc[0]})")
    axes[2].set_xlabel("session turn or prefix group")
    axes[2].set_ylabel("TTFT p50 (ms)")
    if not sliced.empty:
        axes[2].legend(fontsize=7)
    else:
        axes[2].text(0.5, 0.5, "no sessions or prefix groups", ha="center", transform=axes[2].transAxes)
    fig.suptitle(f"What the requests held: {subject}")
    return _save(fig, out, "workload")
