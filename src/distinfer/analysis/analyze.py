"""`distinfer analyze`: one experiment folder in, analysis/<exp>/ out (tables, metrics.json, plots, reports)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from distinfer.analysis import plots
from distinfer.analysis.bundles import load_experiment_outputs
from distinfer.analysis.report import write_report
from distinfer.analysis.tables import (
    batch_sweep,
    correctness,
    optimization,
    precision_tradeoff,
    strong_scaling,
    time_breakdown,
    weak_scaling,
)

# Columns a study can sweep, in the order the optimization table looks for the changed one.
SWEPT_COLUMNS = ("microbatches", "engine", "world_size", "batch_size", "precision", "context_tokens")


def changed_column(runs) -> str | None:  # noqa: ANN001
    """The one column that varies among the non-reference runs (an optimization study's change)."""
    subject = runs[runs["engine"] != "reference"] if not runs.empty else runs
    varying = [c for c in SWEPT_COLUMNS if c in subject and subject[c].nunique(dropna=False) > 1]
    return varying[0] if len(varying) == 1 else None


@dataclass(frozen=True)
class AnalysisResult:
    out: Path
    runs: int
    problems: list[dict]
    plots: list[str]
    study: str = "matrix"


def analyze(experiment_dir: Path, analysis_root: Path) -> AnalysisResult:
    """Load the bundles, write results.parquet/.csv, metrics.json, plots (PNG+SVG) and report.md/.html."""
    loaded = load_experiment_outputs(experiment_dir)
    out = analysis_root / loaded.name
    out.mkdir(parents=True, exist_ok=True)
    runs = loaded.runs
    tables = {
        "results": runs,
        "strong_scaling": strong_scaling(runs),
        "batch_sweep": batch_sweep(runs),
        "weak_scaling": weak_scaling(runs),
        "precision": precision_tradeoff(loaded),
        "optimization": optimization(runs, changed_column(runs)) if loaded.study == "optimization" else pd.DataFrame(),
        "correctness": correctness(loaded),
        "time_breakdown": time_breakdown(loaded.ranks),
    }
    runs.to_parquet(out / "results.parquet", index=False)
    runs.to_csv(out / "results.csv", index=False)
    for name, frame in tables.items():
        if name != "results":
            frame.to_csv(out / f"{name}.csv", index=False)
    (out / "metrics.json").write_text(json.dumps(
        {"experiment": loaded.name, "model": loaded.model, "hardware": loaded.hardware, "problems": loaded.problems,
         "study": loaded.study,
         **{name: json.loads(frame.to_json(orient="records")) for name, frame in tables.items()}}, indent=2) + "\n")
    subject = f"{loaded.model} on {loaded.hardware}"
    made: list[str] = []
    plot_dir = out / "plots"
    if not tables["strong_scaling"].empty:
        plots.strong_scaling_plot(tables["strong_scaling"], subject, plot_dir)
        made.append("strong_scaling")
    if not tables["weak_scaling"].empty:
        plots.weak_scaling_plot(tables["weak_scaling"], subject, plot_dir)
        made.append("weak_scaling")
    if not tables["precision"].empty:
        plots.precision_plot(tables["precision"], subject, plot_dir)
        made.append("precision")
    if not runs.empty:
        plots.batch_sweep_plot(tables["batch_sweep"], subject, plot_dir)
        plots.latency_plot(runs, subject, plot_dir)
        made += ["batch_sweep", "latency"]
    if not tables["time_breakdown"].empty:
        plots.time_breakdown_plot(tables["time_breakdown"], subject, plot_dir)
        made.append("time_breakdown")
    write_report(loaded, tables, made, out)
    return AnalysisResult(out, len(runs), loaded.problems, made, loaded.study)
