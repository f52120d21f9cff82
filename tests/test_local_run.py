"""`distinfer run --local` end to end: real torchrun, real gloo ranks, the run bundle on disk."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import kill_run, rank_pid, run_scratch, wait_for_first_completion

from bench.experiments import experiment_file
from distinfer.runtime.cpu.kernels import FEW_ROWS_KERNELS, ONE_ROW_KERNELS
from distinfer.runtime.cpu.openmp import SHARED_NODE_SPINCOUNT

REPO = Path(__file__).resolve().parent.parent
SUMMARY_FIELDS = {"status", "error", "run_id", "engine", "world_size", "batch_size", "output_tokens",
                  "output_tokens_per_s", "prompts_per_s", "ttft_s", "tpot_s", "itl_s", "e2e_s", "ranks",
                  "load_s", "tokenize_s"}
RANK_FIELDS = {"layers", "compute_s", "comm_s", "wait_s", "peak_memory_bytes", "utilization"}


def write_config(path: Path, body: str) -> Path:
    return experiment_file(path, body=body)


def stop_everything(proc: subprocess.Popen, run_dir: Path) -> None:
    """SIGKILL the CLI and torchrun (one process group), then the ranks (torchrun gives them their own sessions)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    kill_run(run_dir)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distinfer", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def study(local_study: Path) -> Path:
    """The session's real local study (conftest.local_study): reference, pipeline pp 1 and 2, DeepSpeed tp 2."""
    return local_study


def test_bundle_has_the_documented_files_and_fields(study: Path) -> None:
    run = study / "outputs" / "t" / "pipeline-pp2-b4-mb2-fp32"
    for name in ("run.json", "rank_0.log", "rank_1.log", "metrics_rank_0.json", "metrics_rank_1.json",
                 "completions.jsonl", "summary.json"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_FIELDS <= summary.keys()
    assert summary["status"] == "ok" and summary["world_size"] == 2 and summary["output_tokens"] == 20 * 8
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        assert set(summary[key]) == {"mean", "p50", "p90", "p99"}
        assert 0 < summary[key]["p50"] <= summary[key]["p99"]
    assert summary["ttft_s"]["p50"] < summary["e2e_s"]["p50"]
    assert [r["layers"] for r in summary["ranks"]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for rank in summary["ranks"]:
        assert RANK_FIELDS <= rank.keys() and rank["compute_s"] > 0 and rank["peak_memory_bytes"] > 0
        assert rank["one_row_kernel"] in ONE_ROW_KERNELS, "each CPU stage timed its one-row kernels"
        assert rank["few_rows_kernel"] in FEW_ROWS_KERNELS, "and its few-row kernels"
        assert rank["decode_path"] == "llama_decoder_cpp"  # runtime/cpu/llama_decode.py: a Llama stage on CPU
        one, few = rank["one_row_kernel"] == "cpp", rank["few_rows_kernel"] == "cpp"  # linear_rows chosen
        expected = [1 if one else 2, 24 if few else 1] if one or few else None
        assert rank["one_call_rows"] == expected, "whole steps in one C++ call where linear_rows runs every product"
    reference = json.loads((study / "outputs/t/reference-b4-fp32/summary.json").read_text())
    assert reference["ranks"][0]["decode_path"] is None  # the reference is transformers' own forward
    assert "decode steps through llama_decoder_cpp" in (run / "rank_0.log").read_text()
    steps = json.loads((run / "metrics_rank_1.json").read_text())["steps"]
    assert {"compute_s", "send_s", "wait_s", "mb", "step"} <= steps[0].keys()
    assert {s["mb"] for s in steps} == {0, 1}
    run_json = json.loads((run / "run.json").read_text())
    assert run_json["run"]["pp"] == 2 and run_json["config_hash"] == summary["config_hash"]
    assert run_json["provenance"]["packages"]["torch"] and run_json["runtime"]["hostnames"]
    assert "rank1 INFO start run pipeline-pp2-b4-mb2-fp32" in (run / "rank_1.log").read_text()
    # OpenMP's spin count (runtime/cpu/openmp.py): shorter for ranks that share a node, the default for one alone
    user = os.environ.get("GOMP_SPINCOUNT")
    assert f"OpenMP spin count: {user or SHARED_NODE_SPINCOUNT}\n" in (run / "rank_1.log").read_text()
    reference_log = (study / "outputs/t/reference-b4-fp32/rank_0.log").read_text()
    assert f"OpenMP spin count: {user or 'default'}\n" in reference_log
    assert [r["openmp_spin_count"] for r in summary["ranks"]] == [user or SHARED_NODE_SPINCOUNT] * 2
    assert reference["ranks"][0]["openmp_spin_count"] == user
    assert run_json["runtime"]["env"].get("GOMP_SPINCOUNT") == (user or SHARED_NODE_SPINCOUNT), "in run.json too"


def test_pipeline_completions_equal_the_reference_run(study: Path) -> None:
    def load(run_id: str) -> list[dict]:
        return [json.loads(line) for line in (study / "outputs" / "t" / run_id / "completions.jsonl").open()]

    reference, pipeline = load("reference-b4-fp32"), load("pipeline-pp2-b4-mb2-fp32")
    assert len(reference) == 20
    assert [r["output_token_ids"] for r in reference] == [p["output_token_ids"] for p in pipeline]
    assert [r["id"] for r in reference] == [p["id"] for p in pipeline]
    assert all(p["text"] for p in pipeline)


def test_deepspeed_tp2_equals_the_reference_and_shards_the_model(study: Path) -> None:
    run = study / "outputs" / "t" / "deepspeed-tp2-b4-fp32"
    reference = [json.loads(line)["output_token_ids"] for line in (study / "outputs/t/reference-b4-fp32/completions.jsonl").open()]
    tensor = [json.loads(line)["output_token_ids"] for line in (run / "completions.jsonl").open()]
    assert tensor == reference
    assert json.loads((run / "ds_config.json").read_text()) == {
        "tensor_parallel": {"tp_size": 2}, "dtype": "float32", "replace_with_kernel_inject": False}
    summary = json.loads((run / "summary.json").read_text())
    full = json.loads((study / "outputs/t/reference-b4-fp32/summary.json").read_text())["ranks"][0]["parameters"]
    assert summary["world_size"] == 2
    assert all(r["parameters"] < 0.7 * full for r in summary["ranks"]), "each TP rank holds a shard"
    # DeepSpeed's CPU all-reduce segments (66 MB of RAM per rank) do not outlive the run
    before = set(json.loads((study / "shm-before.json").read_text()))
    assert {p.name for p in Path("/dev/shm").glob("deepspeed_*")} <= before
    # nor does what torchrun writes to the temporary folder (the run's processes get one of their own)
    left = set(json.loads((study / "tmp-after.json").read_text())) - set(json.loads((study / "tmp-before.json").read_text()))
    assert not left, left
    # the stale build lock planted before the study did not stop it, and is gone: the first rank to build or
    # load an op (a pipeline rank's C++ decode ops, or DeepSpeed's all-reduce) removed it and said so, once
    assert json.loads((study / "stale-lock-left.json").read_text()) is False
    logs = "".join(p.read_text() for p in sorted((study / "outputs").rglob("rank_*.log")))
    assert logs.count("left by an op build that was killed") == 1, logs


def test_second_run_skips_finished_runs_unless_forced(study: Path) -> None:
    config = study / "e.yaml"
    again = cli("run", str(config), "--local", cwd=study)
    assert again.returncode == 0 and len(re.findall(r"^\s*skipped  ", again.stdout, re.M)) == 3, again.stdout
    summary = study / "outputs" / "t" / "reference-b4-fp32" / "summary.json"
    before = summary.stat().st_mtime_ns
    # The same experiment's reference run alone (a file that lists only it): done, yet run again when forced.
    reference = write_config(study / "reference.yaml", "generation: {max_new_tokens: 8}\n"
                             "parallel: {engine: reference}\nbatch_size: 4\n")
    assert re.search(r"skipped\s+reference-b4-fp32", cli("run", str(reference), "--local", cwd=study).stdout)
    forced = cli("run", str(reference), "--local", "--force", cwd=study)
    assert forced.returncode == 0 and "skipped" not in forced.stdout and "reference-b4-fp32" in forced.stdout
    assert summary.stat().st_mtime_ns != before


def test_killed_run_leaves_whole_json_lines_and_no_half_written_json(tmp_path: Path, tiny_models) -> None:  # noqa: ANN001
    config = write_config(tmp_path / "e.yaml", "generation: {max_new_tokens: 400}\nparallel: {pp: 2}\nbatch_size: 1\n"
                          "reference: none\n")
    completions = tmp_path / "outputs" / "t" / "pipeline-pp2-b1-mb1-fp32" / "completions.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "distinfer", "run", str(config), "--local"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if completions.is_file() and len(completions.read_text().splitlines()) >= 2:
                break
            time.sleep(0.1)
        else:
            pytest.fail("no completions appeared")
    finally:
        stop_everything(proc, completions.parent)
        proc.wait(timeout=30)
    lines = completions.read_text().splitlines()
    assert 2 <= len(lines) < 20
    for line in lines:
        assert len(json.loads(line)["output_token_ids"]) > 0
    bundle = completions.parent
    assert not (bundle / "summary.json").exists(), "an unfinished run has no summary"
    for path in bundle.glob("*.json"):
        json.loads(path.read_text())  # whole or absent, never half-written


def test_sigterm_makes_every_rank_write_its_state(tmp_path: Path, tiny_models) -> None:  # noqa: ANN001
    """What Slurm does at the time limit and on scancel: SIGTERM to every process of the job."""
    config = write_config(tmp_path / "e.yaml", "generation: {max_new_tokens: 400}\nparallel: {pp: 2}\nbatch_size: 1\n"
                          "reference: none\n")
    run_dir = tmp_path / "outputs" / "t" / "pipeline-pp2-b1-mb1-fp32"
    proc = subprocess.Popen([sys.executable, "-m", "distinfer", "run", str(config), "--local"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    scratch: set[str] = set()
    try:
        wait_for_first_completion(run_dir)
        scratch = run_scratch(run_dir)  # the launcher, stopped by SIGTERM, leaves it
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30  # the ranks write on their own (torchrun gives them their own sessions)
        written = [run_dir / name for name in ("summary.json", "metrics_rank_0.json", "metrics_rank_1.json")]
        while not all(path.exists() for path in written) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop_everything(proc, run_dir)
        for folder in scratch:
            shutil.rmtree(folder, ignore_errors=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "cancelled" and "SIGTERM" in summary["error"]
    for rank in (0, 1):
        metrics = json.loads((run_dir / f"metrics_rank_{rank}.json").read_text())
        assert "SIGTERM" in metrics["error"]
    assert "stopped by SIGTERM" in (run_dir / "rank_1.log").read_text()
    for line in (run_dir / "completions.jsonl").read_text().splitlines():
        json.loads(line)
    from distinfer.bundle import RunBundle

    assert not RunBundle(run_dir).is_done(), "a cancelled run is run again"


def test_a_dead_rank_fails_the_run_and_is_named(tmp_path: Path, tiny_models) -> None:  # noqa: ANN001
    config = write_config(tmp_path / "e.yaml", "generation: {max_new_tokens: 400}\n"
                          "parallel: {pp: 2, timeout_s: 20}\nbatch_size: 1\nreference: none\n")
    run_dir = tmp_path / "outputs" / "t" / "pipeline-pp2-b1-mb1-fp32"
    proc = subprocess.Popen([sys.executable, "-m", "distinfer", "run", str(config), "--local"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_first_completion(run_dir)
        victim = rank_pid(run_dir, 1)
        assert victim is not None
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        output, _ = proc.communicate(timeout=60)
        stopped_after = time.monotonic() - killed_at
    finally:
        stop_everything(proc, run_dir)
    assert proc.returncode == 1, output
    assert stopped_after < 20, f"the other rank took {stopped_after:.1f}s to stop"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["dead_ranks"] == [1]
    assert "rank(s) [1] died" in summary["error"]
    assert [r["rank"] for r in summary["ranks"]] == [0]
    lines = (run_dir / "completions.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line)["output_token_ids"] for line in lines)


def test_out_of_memory_is_reported_with_the_numbers_and_does_not_hang(tmp_path: Path, tiny_models) -> None:  # noqa: ANN001
    """A real allocation failure: each rank's heap is capped (DISTINFER_RANK_MEMORY_LIMIT, RLIMIT_DATA on CPU;
    a memory fraction on CUDA) below what a batch of four ~3.7k-token prompts needs in prefill."""
    words = "the quick brown fox jumps over a lazy dog while rivers carry old stones to the sea".split()
    prompts = tmp_path / "long.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": " ".join(words[(i + j) % len(words)]
                                           for j in range(1800))}) + "\n" for i in range(4)))
    (tmp_path / "e.yaml").write_text(f"name: t\nmodel: {{builtin: tiny-llama}}\nprompts: {prompts}\n"
                                     "generation: {max_new_tokens: 4}\nparallel: {pp: 2, timeout_s: 300}\n"
                                     "batch_size: 4\nreference: none\n")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "distinfer", "run", "e.yaml", "--local"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=280,
                          env={**os.environ, "DISTINFER_RANK_MEMORY_LIMIT": str(750 * 10**6)})
    took = time.monotonic() - started
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert took < 60, f"{took:.0f}s: the ranks must not wait for the 300 s collective timeout"
    summary = json.loads((tmp_path / "outputs/t/pipeline-pp2-b4-mb1-fp32/summary.json").read_text())
    assert summary["status"] == "failed", summary
    assert "out of memory in batch 0 (4 prompt(s) of up to" in summary["error"], summary["error"]
    assert "batch_size 4, float32" in summary["error"] and "of a 0.70 GiB limit" in summary["error"]
    assert "out of memory" in " ".join(proc.stdout.split())


def terminal_signals() -> None:
    """A command typed in a terminal starts with Ctrl-C's default action, unblocked; a child of this test process
    would otherwise inherit whatever dispositions and mask the test process has come to hold."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def test_ctrl_c_then_again_gives_the_same_results_as_one_uninterrupted_study(study: Path, tmp_path: Path) -> None:
    """Ctrl-C in a terminal: SIGINT to the foreground process group (the CLI and torchrun) in the middle of the
    second run. The first run stays done; the same command again reruns only the rest; the completions then
    equal those of the uninterrupted `study` (same runs and settings, more benchmark repeats to be slow)."""
    config = write_config(tmp_path / "e.yaml", "generation: {max_new_tokens: 8}\n"
                          "parallel: {engine: [reference, pipeline], pp: 2, microbatches: 2}\n"
                          "batch_size: 4\nbenchmark: {repeats: 8}\n")
    out = tmp_path / "outputs" / "t"
    proc = subprocess.Popen([sys.executable, "-m", "distinfer", "run", str(config), "--local"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=terminal_signals)
    try:
        wait_for_first_completion(out / "pipeline-pp2-b4-mb2-fp32")
        os.killpg(proc.pid, signal.SIGINT)
        out_text, err = proc.communicate(timeout=60)
    finally:
        stop_everything(proc, out / "pipeline-pp2-b4-mb2-fp32")
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err + out_text
    assert json.loads((out / "reference-b4-fp32/summary.json").read_text())["status"] == "ok"
    assert json.loads((out / "pipeline-pp2-b4-mb2-fp32/summary.json").read_text())["status"] == "cancelled"
    again = cli("run", str(config), "--local", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert re.search(r"skipped\s+reference-b4-fp32", again.stdout) and re.search(r"ok\s+pipeline", again.stdout)
    for run_id in ("reference-b4-fp32", "pipeline-pp2-b4-mb2-fp32"):
        assert (out / run_id / "completions.jsonl").read_text() == \
            (study / "outputs" / "t" / run_id / "completions.jsonl").read_text(), run_id
