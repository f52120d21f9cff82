"""`distinfer analyze`: one experiment folder in, analysis/<exp>/ out (tables, metrics.json, plots, reports)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from distinfer.analysis import plots
from distinfer.analysis.bundles import load_experiment_outputs
from distinfer.analysis.report import write_report
from distinfer.analysis.tables import (
    batch_sweep,
    correctness,
    experts,
    optimization,
    precision_tradeoff,
    serving,
    serving_knee,
    strong_scaling,
    time_breakdown,
    weak_scaling,
)
from distinfer.analysis.workload import lengths, workload_table
from distinfer.engines import REFERENCE, program_of

# Columns a study can sweep, in the order the optimization table looks for the changed one.
SWEPT_COLUMNS = ("microbatches", "engine", "world_size", "batch_size", "precision", "context_tokens")


def changed_column(runs) -> str | None:  # noqa: ANN001
    """The one column that varies among the non-reference runs (an optimization study's change)."""
    subject = runs[runs["engine"] != REFERENCE] if not runs.empty else runs
    varying = [c for c in SWEPT_COLUMNS if c in subject and subject[c].nunique(dropna=False) > 1]
    return varying[0] if len(varying) == 1 else None


def _prediction(experiment_dir: Path, loaded, others: Sequence[Path]) -> pd.DataFrame:  # noqa: ANN001
    """Predicted against measured for every run (predict/study.py), calibrated on one-rank runs of this
    experiment or of `others` analysed with it; a run the model cannot predict becomes a problem line, never a
    failed analysis."""
    from distinfer.models.tiny import cache_dir
    from distinfer.predict.study import predicted_against_measured
    from distinfer.probes.cpu import cpu_probe

    try:
        table = predicted_against_measured(experiment_dir, cpu_probe(cache_dir()), others)
    except (ImportError, ValueError, OSError) as exc:
        loaded.problems.append({"run_id": "(prediction)", "problem": f"not predicted: {exc}"})
        return pd.DataFrame()
    for engine, warning in sorted(set(zip(table.get("engine", []), table.get("fit_warning", [])))):
        if warning:  # a fit that ended on a bound or misses its own runs is no calibration: said where users look
            loaded.warnings.append(f"prediction of {engine}: {warning}")
    return table


@dataclass(frozen=True)
class AnalysisResult:
    out: Path
    runs: int
    problems: list[dict]
    plots: list[str]
    study: str = "matrix"
    warnings: list[str] = dataclasses.field(default_factory=list)


def analyze(experiment_dir: Path, analysis_root: Path, others: Sequence[Path] = ()) -> AnalysisResult:
    """Load the bundles, write results.parquet/.csv, metrics.json, plots (PNG+SVG) and report.md/.html; `others`:
    experiments analysed with this one (their one-rank runs calibrate the prediction where this has none)."""
    loaded = load_experiment_outputs(experiment_dir)
    out = analysis_root / loaded.name
    out.mkdir(parents=True, exist_ok=True)
    runs = loaded.runs
    offline = runs[runs["scenario"] != "serving"] if "scenario" in runs else runs
    offline_loaded = dataclasses.replace(loaded, runs=offline)
    served = serving(runs)
    requests = lengths(experiment_dir, list(served["run_id"])) if not served.empty else pd.DataFrame()
    # distinfer's served tokens are checked against the offline reference at batch 1 (a request decodes as if
    # alone); a served reference run is a subject there, not a reference
    local = (runs[(runs["scenario"] == "serving") & (runs["engine"].map(program_of) != "endpoint")]
             if "scenario" in runs else runs[:0])
    checked = offline_loaded if local.empty else dataclasses.replace(loaded, runs=pd.concat([offline, local.assign(
        batch_size=1, engine=local["engine"].replace("reference", "reference (served)"))], ignore_index=True))
    tables = {
        "results": runs,
        "strong_scaling": strong_scaling(offline),
        "batch_sweep": batch_sweep(offline) if plots.batch_sweep_applies(offline) else pd.DataFrame(),
        "weak_scaling": weak_scaling(offline),
        "precision": precision_tradeoff(offline_loaded),
        "optimization": (optimization(offline, changed_column(offline)) if loaded.study == "optimization"
                         else pd.DataFrame()),
        "correctness": correctness(checked),
        "time_breakdown": time_breakdown(loaded.ranks),
        "experts": experts(loaded.ranks),
        "serving": served,
        "serving_knee": serving_knee(served),
        "workload": workload_table(requests),
        "prediction": _prediction(experiment_dir, loaded, others),
    }
    # Only the tables that apply to this study's runs are written: no empty files without a header.
    tables = {name: frame for name, frame in tables.items() if name == "results" or not frame.empty}
    runs.to_parquet(out / "results.parquet", index=False)
    runs.to_csv(out / "results.csv", index=False)
    for stale in out.glob("*.csv"):  # a table an earlier analysis of this folder wrote that no longer applies
        if stale.stem not in tables:
            stale.unlink()
    for name, frame in tables.items():
        if name != "results":
            frame.to_csv(out / f"{name}.csv", index=False)
    (out / "metrics.json").write_text(json.dumps(
        {"experiment": loaded.name, "model": loaded.model, "hardware": loaded.hardware, "problems": loaded.problems,
         "warnings": loaded.warnings, "study": loaded.study,
         **{name: json.loads(frame.to_json(orient="records")) for name, frame in tables.items()}}) + "\n")
    subject = f"{loaded.model} on {loaded.hardware}"
    plot_dir = out / "plots"
    for stale in plot_dir.glob("*"):
        stale.unlink()
    drawn = {
        "strong_scaling": lambda: plots.strong_scaling_plot(tables["strong_scaling"], subject, plot_dir),
        "weak_scaling": lambda: plots.weak_scaling_plot(tables["weak_scaling"], subject, plot_dir),
        "precision": lambda: plots.precision_plot(tables["precision"], subject, plot_dir),
        "batch_sweep": lambda: plots.batch_sweep_plot(tables["batch_sweep"], subject, plot_dir),
        "latency": lambda: plots.latency_plot(offline, subject, plot_dir),
        "latency_throughput": lambda: plots.latency_throughput_plot(tables["serving"], subject, plot_dir),
        "goodput": lambda: plots.goodput_plot(tables["serving"], subject, plot_dir),
        "time_breakdown": lambda: plots.time_breakdown_plot(runs, loaded.ranks, subject, plot_dir),
        "prediction": lambda: plots.prediction_plot(tables["prediction"], subject, plot_dir),
        "workload": lambda: plots.workload_plot(requests, tables["workload"], subject, plot_dir),
    }
    made: list[str] = []
    for name, draw in drawn.items():
        offline_study = not offline.empty and "serving" not in tables  # a serving study's offline runs are its references
        applies = {"latency": offline_study, "time_breakdown": offline_study and "time_breakdown" in tables,
                   "latency_throughput": "serving" in tables,
                   "goodput": "serving" in tables and (tables["serving"]["load"] == "rate").any()}
        if applies.get(name, name in tables):
            draw()
            made.append(name)
    write_report(loaded, tables, made, out)
    return AnalysisResult(out, len(runs), loaded.problems, made, loaded.study, loaded.warnings)
