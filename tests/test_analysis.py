"""The analysis stage on bundles from real local runs, on damaged outputs, and its math on known numbers."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import pytest

from distinfer.analysis.tables import (
    first_divergence,
    strong_scaling,
    token_agreement,
    weak_scaling,
    weak_scaling_efficiency,
)

REPO = Path(__file__).resolve().parent.parent


def test_strong_scaling_math_on_known_numbers() -> None:
    runs = pd.DataFrame([
        {"run_id": "a", "engine": "pipeline", "batch_size": 4, "precision": "float32", "microbatches": 1,
         "world_size": 1, "output_tokens_per_s": 100.0},
        {"run_id": "b", "engine": "pipeline", "batch_size": 4, "precision": "float32", "microbatches": 1,
         "world_size": 2, "output_tokens_per_s": 150.0},
        {"run_id": "c", "engine": "pipeline", "batch_size": 4, "precision": "float32", "microbatches": 1,
         "world_size": 4, "output_tokens_per_s": 200.0},
    ])
    table = strong_scaling(runs).set_index("run_id")
    assert table.loc["a", "speedup"] == 1.0 and table.loc["b", "speedup"] == 1.5
    assert table.loc["c", "efficiency"] == pytest.approx(0.5)
    assert weak_scaling_efficiency(10.0, 12.5) == pytest.approx(0.8)
    assert token_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75 and token_agreement([1, 2], [1, 2, 3, 4]) == 0.5
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2


def test_weak_scaling_table_on_known_numbers() -> None:
    """n ranks get n x the prompts; T(n) is the wall time of one pass, efficiency T(1)/T(n)."""
    runs = pd.DataFrame([
        {"run_id": f"r{n}", "engine": "pipeline", "batch_size": 4, "precision": "float32", "microbatches": 1,
         "world_size": n, "num_prompts": 4 * n, "wall_s": wall, "repeats": 2, "output_tokens_per_s": 1.0}
        for n, wall in ((1, 20.0), (2, 25.0), (4, 40.0))
    ])
    table = weak_scaling(runs).set_index("run_id")
    assert table["pass_s"].tolist() == [10.0, 12.5, 20.0]
    assert table["efficiency"].tolist() == pytest.approx([1.0, 0.8, 0.5])
    assert table.loc["r4", "prompts"] == 16


@pytest.fixture(scope="module")
def outputs(local_study: Path) -> Path:
    """The session's real local study (conftest.local_study): experiment `t` with the reference, pipeline pp 1 and
    2 (two micro-batches) and DeepSpeed tp 2, batch 4, 8 new tokens."""
    return local_study / "outputs"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, tiny_models) -> Path:  # noqa: ANN001
    """Eight finished bundles as runs leave them (bench.harness): the reference and pipeline pp 1-4 at batch 1
    and 2, for the tables and plots that need groups, not real runs."""
    from bench.harness import write_synthetic_experiment

    return write_synthetic_experiment(tmp_path_factory.mktemp("synthetic"), "study", bundles=8,
                                      model=tiny_models["tiny-llama"], prompts=REPO / "prompts/correctness.jsonl")


def analyze(folder: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distinfer", "analyze", str(folder), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)


def test_tables_from_real_runs(outputs: Path, tmp_path: Path) -> None:
    proc = analyze(outputs / "t", tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "t"
    results = pd.read_parquet(out / "results.parquet")
    runs = {"reference-b4-fp32", "pipeline-pp1-b4-mb2-fp32", "pipeline-pp2-b4-mb2-fp32", "deepspeed-tp2-b4-fp32"}
    assert set(results["run_id"]) == runs and (results["output_tokens"] == 20 * 8).all()
    assert (pd.read_csv(out / "results.csv")["run_id"].tolist() == results["run_id"].tolist())
    metrics = json.loads((out / "metrics.json").read_text())
    scaling = {r["run_id"]: r for r in metrics["strong_scaling"]}
    assert scaling["pipeline-pp1-b4-mb2-fp32"]["speedup"] == 1.0
    assert scaling["pipeline-pp2-b4-mb2-fp32"]["efficiency"] == pytest.approx(
        scaling["pipeline-pp2-b4-mb2-fp32"]["speedup"] / 2)
    assert {r["exact_match_rate"] for r in metrics["correctness"]} == {1.0}
    breakdown = pd.read_csv(out / "time_breakdown.csv")
    assert set(breakdown[breakdown["run_id"] == "pipeline-pp2-b4-mb2-fp32"]["rank"]) == {0, 1}
    assert (breakdown["compute_s"] > 0).all()
    assert metrics["problems"] == []
    # every run predicted; the model fitted on the one-rank runs (reference, pp 1) and predicting the others
    prediction = pd.read_csv(out / "prediction.csv")
    assert set(prediction["run_id"]) == runs
    assert set(prediction["metric"]) == {"tpot", "ttft", "tokens_per_s"}
    fitted = prediction.groupby("run_id")["calibrated_on"].first()
    assert not fitted["pipeline-pp2-b4-mb2-fp32"] and fitted["pipeline-pp1-b4-mb2-fp32"] and fitted["reference-b4-fp32"]
    two_stage = prediction[prediction["run_id"] == "pipeline-pp2-b4-mb2-fp32"].set_index("metric")
    assert 1 / 3 < two_stage.loc["tokens_per_s", "predicted"] / two_stage.loc["tokens_per_s", "measured"] < 3
    assert prediction["error"].tolist() == pytest.approx((prediction["predicted"] / prediction["measured"] - 1).tolist())


def test_plots_exist_open_and_have_labelled_axes(synthetic: Path, tmp_path: Path) -> None:
    import matplotlib.image

    assert analyze(synthetic, tmp_path).returncode == 0
    plots = tmp_path / "study" / "plots"
    expected = {"strong_scaling": "speedup", "batch_sweep": "batch size", "time_breakdown": "time per rank",
                "latency": "TTFT", "prediction": "predicted output tokens/s"}
    for name, label in expected.items():
        image = matplotlib.image.imread(plots / f"{name}.png")
        assert image.shape[0] > 100 and image.shape[1] > 100
        texts = " ".join(t.text or "" for t in ET.parse(plots / f"{name}.svg").iter() if t.tag.endswith("text"))
        assert label in texts and "tiny-llama on CPU" in texts, (name, texts[:300])
    report = (tmp_path / "study" / "report.html").read_text()
    assert all(f"plots/{name}.svg" in report for name in expected)


def test_damaged_outputs_are_listed_and_the_rest_analysed(synthetic: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "study"
    shutil.copytree(synthetic, damaged)
    truncated, no_rank_1, unfinished, empty, older, source = (
        "reference-pp1-b1-mb1-float32-r0", "pipeline-pp2-b1-mb1-float32-r1", "pipeline-pp3-b1-mb1-float32-r2",
        "pipeline-pp4-b1-mb1-float32-r3", "pipeline-pp2-b2-mb1-float32-r5", "pipeline-pp1-b2-mb1-float32-r4")
    summary = damaged / truncated / "summary.json"
    summary.write_text(summary.read_text()[:40])
    (damaged / no_rank_1 / "metrics_rank_1.json").unlink()
    foreign = damaged / f"{source}-other"
    shutil.copytree(damaged / source, foreign)
    run_json = json.loads((foreign / "run.json").read_text())
    run_json["run"]["experiment"] = "another-study"
    (foreign / "run.json").write_text(json.dumps(run_json))
    (damaged / unfinished / "summary.json").unlink()
    (damaged / empty / "summary.json").write_text("")
    run_json = json.loads((damaged / older / "run.json").read_text())
    del run_json["schema"]  # as written before bundles had a schema number
    (damaged / older / "run.json").write_text(json.dumps(run_json))
    proc = analyze(damaged, tmp_path / "analysis")
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "analysis" / "study" / "report.md").read_text()
    assert f"`{truncated}`: summary.json unreadable" in report
    assert f"`{no_rank_1}`: metrics of rank(s) [1] missing" in report
    assert f"`{source}-other`: belongs to experiment 'another-study'" in report
    assert f"`{unfinished}`: unfinished" in report
    assert f"`{empty}`: summary.json unreadable" in report
    assert f"`{older}`: bundle schema 1 from another distinfer version" in report
    results = pd.read_parquet(tmp_path / "analysis" / "study" / "results.parquet")
    assert sorted(results["run_id"]) == sorted([no_rank_1, source, "pipeline-pp3-b2-mb1-float32-r6",
                                                "pipeline-pp4-b2-mb1-float32-r7"])


@pytest.fixture(scope="module")
def precision_outputs(tmp_path_factory) -> Path:  # noqa: ANN001
    """A real precision sweep on the trained tiny Llama (built here if missing: about a minute), fp32 vs int8,
    references planned automatically, perplexity on the shipped text, and a torch.profiler trace per rank."""
    work = tmp_path_factory.mktemp("precision")
    config = work / "e.yaml"
    config.write_text(f"name: prec\nstudy: precision-sweep\nmodel: {{builtin: tiny-llama-trained, dtype: [float32, int8]}}\n"
                      f"prompts: {REPO / 'prompts/correctness.jsonl'}\ngeneration: {{max_new_tokens: 8}}\n"
                      "parallel: {pp: 2}\nbatch_size: 4\nbenchmark: {profile: torch}\n"
                      f"accuracy: {{perplexity_text: {REPO / 'prompts/texts/perplexity.txt'}}}\n")
    proc = subprocess.run([sys.executable, "-m", "distinfer", "run", str(config), "--local"], cwd=work,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return work / "outputs"


def test_precision_sweep_reports_agreement_and_perplexity(precision_outputs: Path, tmp_path: Path) -> None:
    proc = analyze(precision_outputs / "prec", tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(tmp_path / "prec" / "precision.csv").set_index("run_id")
    assert set(table.index) == {"pipeline-pp2-b4-mb1-fp32", "pipeline-pp2-b4-mb1-int8", "reference-b4-fp32",
                                "reference-b4-int8"}, "references are planned automatically per precision"
    assert table.loc["pipeline-pp2-b4-mb1-fp32", "token_agreement"] == 1.0
    assert 0.0 < table.loc["pipeline-pp2-b4-mb1-int8", "token_agreement"] <= 1.0
    assert table.loc["reference-b4-fp32", "perplexity_change"] == 0.0
    assert table.loc["reference-b4-int8", "perplexity"] > 1.0
    assert abs(table.loc["reference-b4-int8", "perplexity_change"]) < 0.5, "int8 weight-only barely moves perplexity"
    correctness = pd.read_csv(tmp_path / "prec" / "correctness.csv").set_index("run_id")
    assert correctness.loc["pipeline-pp2-b4-mb1-int8", "reference"] == "reference-b4-int8"
    assert (correctness["exact_match_rate"] == 1.0).all(), "the pipeline equals the reference at each precision"
    svg = (tmp_path / "prec" / "plots" / "precision.svg").read_text()
    assert "token agreement with the baseline" in svg and "output throughput (tokens/s)" in svg
    assert "Precision and quantization" in (tmp_path / "prec" / "report.md").read_text()


def test_torch_profile_writes_a_trace_per_rank(precision_outputs: Path) -> None:
    run = precision_outputs / "prec" / "pipeline-pp2-b4-mb1-fp32"
    for rank in (0, 1):
        trace = json.loads((run / f"trace_rank_{rank}.json").read_text())
        assert any(e.get("ph") == "X" for e in trace["traceEvents"]), "complete events: opens in Perfetto"


def test_predict_calibrates_on_the_one_rank_runs_and_stores_the_fit(outputs: Path, tmp_path: Path) -> None:
    shutil.copytree(outputs.parent, tmp_path / "study")  # the fit is stored beside the runs: in a copy
    study = tmp_path / "study"
    proc = subprocess.run([sys.executable, "-m", "distinfer", "predict", str(study / "e.yaml"), "--calibrate",
                           str(study / "outputs" / "t")], cwd=study, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for engine in ("pipeline", "reference"):  # a fit that ends on a bound says so, on a noisy machine too
        assert re.search(rf"calibrated(?: \(fit not trusted\):)? {engine} on 1 run\(s\)", proc.stdout), proc.stdout
    stored = json.loads((study / "outputs" / "t" / "calibration.json").read_text())
    assert set(stored["efficiency"]) == {"pipeline", "reference"}
    assert {o["run_id"] for o in stored["observations"]} == {"pipeline-pp1-b4-mb2-fp32", "reference-b4-fp32"}
    assert stored["probe"]["cores"] >= 1 and stored["fit"]["pipeline"]["median_abs_error"] >= 0
    table = proc.stdout
    for run in ("pipeline-pp2-b4-mb2-fp32", "reference-b4-fp32"):
        assert run in table
    assert "best for most tokens/s:" in table and "efficiencies: calibration file" in table
