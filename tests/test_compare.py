"""`distinfer compare`: the verdict rule and the bootstrap on known samples, and real studies compared as a user
compares them: a serving study run twice (unchanged) and served with max_batch 1 instead of 8 (regressed,
exit status 1), and an offline study run twice."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from distinfer.analysis.compare import CompareError, Samples, _change_interval, parse_thresholds, verdict

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.experiments import experiment_file, run_local  # noqa: E402


def test_the_verdict_needs_the_whole_interval_beyond_the_threshold() -> None:
    assert verdict("ttft_p99_s", 0.30, 0.20, 0.40, 0.05) == ("regressed", True)  # slower beyond 5 %, sure of it
    assert verdict("ttft_p99_s", 0.30, 0.01, 0.60, 0.05) == ("unchanged", False)  # beyond, but not with confidence
    assert verdict("ttft_p99_s", 0.01, -0.02, 0.03, 0.05) == ("unchanged", True)  # inside the threshold, sure of it
    assert verdict("output_tokens_per_s", 0.30, 0.20, 0.40, 0.05) == ("improved", True)  # more tokens/s is better
    assert verdict("output_tokens_per_s", -0.30, math.nan, math.nan, 0.05) == ("regressed", False)  # no interval


def test_the_bootstrap_interval_covers_a_known_slowdown_and_excludes_zero() -> None:
    rng = np.random.default_rng(1)
    base = rng.lognormal(0, 0.2, 400)

    def samples(e2e: np.ndarray) -> Samples:
        return Samples(e2e / 4, e2e / 16, e2e, np.full(e2e.size, 16.0), duration_s=10.0)

    change, low, high = _change_interval(samples(base), samples(base * 1.5), "e2e_p50_s", np.random.default_rng(0))
    assert change == pytest.approx(0.5) and 0.3 < low < 0.5 < high < 0.7
    same = rng.lognormal(0, 0.2, 400)
    change, low, high = _change_interval(samples(base), samples(same), "e2e_p50_s", np.random.default_rng(0))
    assert low < 0 < high and verdict("e2e_p50_s", change, low, high, 0.05)[0] == "unchanged"


def test_bad_thresholds_and_metrics_are_named() -> None:
    assert parse_thresholds("5%", ["ttft_p99_s=20%"])["ttft_p99_s"] == pytest.approx(0.2)
    with pytest.raises(CompareError, match="not a threshold"):
        parse_thresholds("five", [])
    with pytest.raises(CompareError, match="METRIC=VALUE"):
        parse_thresholds("5%", ["latency=5%"])


def compare(base: Path, new: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distinfer", "compare", str(base), str(new), "--out", str(out),
                           *options], capture_output=True, text=True, timeout=300)


def test_a_serving_study_twice_is_unchanged_and_max_batch_1_regresses(tmp_path: Path, tiny_models) -> None:  # noqa: ANN001
    """The same local serving study (distinfer's server, one stage) run twice: every run unchanged at the default
    threshold; then served with max_batch 1 instead of 8: regressed with an interval that excludes 0, exit 1."""
    scenario = {"kind": "serving", "rate": 40, "requests": 48, "warmup_requests": 2, "ignore_eos": True,
                "input": "synthetic", "synthetic": {"input_tokens": 24, "output_tokens": 12}, "max_batch": 8}
    for name, batch in (("a", 8), ("b", 8), ("slow", 1)):
        config = experiment_file(tmp_path / f"{name}.yaml", "served", generation={"max_new_tokens": 12},
                                 parallel={"engine": "pipeline"}, reference="none",
                                 scenario={**scenario, "max_batch": batch})
        proc = run_local(config, "--outputs", str(tmp_path / name), timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    same = compare(tmp_path / "a/served", tmp_path / "b/served", tmp_path / "same")
    assert same.returncode == 0, same.stdout + same.stderr
    table = pd.read_csv(tmp_path / "same/compare.csv")
    assert set(table["run_id"]) == {"pipeline-pp1-fp32-rate40"}
    assert (table["verdict"] == "unchanged").all(), table[table["verdict"] != "unchanged"].to_string()
    slow = compare(tmp_path / "a", tmp_path / "slow", tmp_path / "slow-cmp")  # outputs roots work as well
    assert slow.returncode == 1, slow.stdout + slow.stderr
    table = pd.read_csv(tmp_path / "slow-cmp/compare.csv")
    regressed = table[(table["verdict"] == "regressed") & table["confident"]]
    assert {"e2e_p50_s", "ttft_p50_s"} <= set(regressed["metric"]), table.to_string()
    assert ((regressed["change_low"] > 0) | (regressed["change_high"] < 0)).all(), "each interval excludes 0"
    assert (tmp_path / "slow-cmp/compare.html").read_text().count("regressed") >= len(regressed)
    assert "regressed" in slow.stdout and "--base-repeat" in slow.stdout, "says that drift between runs is not in"
    # Another run of the baseline: the drift between the two widens every interval, and max_batch 1 still regresses.
    again = compare(tmp_path / "a", tmp_path / "slow", tmp_path / "again", "--base-repeat", str(tmp_path / "b"))
    assert again.returncode == 1, again.stdout + again.stderr
    widened = pd.read_csv(tmp_path / "again/compare.csv").set_index("metric")
    same = pd.read_csv(tmp_path / "same/compare.csv").set_index("metric")
    assert (widened["drift"] - same["change"].abs()).abs().max() < 1e-9, "drift = the baseline's own change"
    assert widened.loc["e2e_p50_s", "verdict"] == "regressed" and widened.loc["e2e_p50_s", "confident"]


def test_folders_without_a_run_in_common_exit_2_with_one_line(tmp_path: Path, local_study: Path) -> None:
    (tmp_path / "empty").mkdir()
    proc = compare(local_study / "outputs" / "t", tmp_path / "empty", tmp_path / "x")
    assert proc.returncode == 2 and "no runs here" in proc.stderr and "Traceback" not in proc.stderr
    proc = compare(local_study / "outputs" / "t", local_study / "outputs" / "t", tmp_path / "x", "--metric", "speed")
    assert proc.returncode == 2 and "unknown metric 'speed'" in proc.stderr


def test_a_damaged_samples_file_leaves_the_run_without_an_interval(tmp_path: Path) -> None:
    from distinfer.analysis.compare import load_samples

    for text in ("{not json", '{"ttft_s": 3}', "[]"):
        (tmp_path / "samples.json").write_text(text)
        assert load_samples(tmp_path) is None, text
