"""End to end on a real Slurm cluster (munge, slurmctld, two slurmd = two Slurm nodes) on localhost.

The `slurm` fixture (conftest.py) starts it with scripts/local-slurm.sh and stops it again.
"""

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
import yaml

from bench.experiments import experiment_file

REPO = Path(__file__).resolve().parent.parent


def cli(env: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distinfer", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def wait_for_jobs(env: dict, cwd: Path, experiment: str, timeout: float = 240) -> None:
    jobs = json.loads((cwd / "outputs" / experiment / "jobs.json").read_text())
    ids = ",".join(j["job_id"] for j in jobs.values())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", ids], env=env, capture_output=True, text=True).stdout
        if not out.strip():
            return
        time.sleep(0.5)
    pytest.fail(f"jobs {ids} still queued after {timeout}s")


def status_rows(env: dict, cwd: Path, experiment: str) -> dict[str, tuple[str, str]]:
    proc = cli(env, cwd, "status", experiment)
    assert proc.returncode == 0, proc.stderr
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 4 and cells[0] not in ("run", ""):
            rows[cells[0]] = (cells[2], cells[3])
    return rows


def job_logs(out: Path) -> str:
    """The Slurm stdout/stderr of every job under `out`, for assertion messages."""
    return "\n".join(f"--- {log}\n{log.read_text(errors='replace')[-3000:]}" for log in sorted(out.glob("*/slurm-*.*")))


def completions(run_dir: Path) -> list[list[int]]:
    return [json.loads(line)["output_token_ids"] for line in (run_dir / "completions.jsonl").open()]


def write_experiment(path: Path, model: str, engines: str, extra: str = "") -> Path:
    """Experiment `slurm-tiny` on the local cluster; `extra` (YAML) replaces whole sections."""
    return experiment_file(path, "slurm-tiny", model=yaml.safe_load(model), parallel=yaml.safe_load(engines),
                           generation={"max_new_tokens": 8}, batch_size=4, reference="none", body=extra,
                           # the local nodes n1, n2 do not resolve by name: rendezvous on the loopback address
                           cluster={"profile": "cpu", "time": "00:10:00", "env": {"DISTINFER_HEAD_ADDR": "127.0.0.1"}})


TIMED = "pipeline-pp1-fp32-rate0.05"  # the run of the time-limited experiment


@pytest.fixture(scope="module", autouse=True)
def time_limited(slurm, tmp_path_factory, tiny_models) -> Path:  # noqa: ANN001
    """A serving job with a real Slurm time limit of one minute, submitted before the module's other tests and
    checked by the last (slurmctld checks limits every ~30 s: the job ends 60-90 s after it starts). Its load,
    one request every 20 s for 100 requests, outlasts the limit many times and leaves the CPU to the jobs of
    the tests in between, which share the two nodes with it."""
    work = tmp_path_factory.mktemp("time-limit")
    config = work / "e.yaml"
    config.write_text(
        f"name: slurm-limit\nmodel: {{builtin: tiny-gpt2}}\nprompts: {REPO / 'prompts/correctness.jsonl'}\n"
        "generation: {max_new_tokens: 8}\nparallel: {engine: pipeline}\nreference: none\n"
        "scenario: {kind: serving, rate: 0.05, requests: 100, warmup_requests: 0}\n"
        "cluster: {profile: cpu, time: '00:01:00', env: {DISTINFER_HEAD_ADDR: 127.0.0.1}}\n")
    proc = cli(slurm, work, "submit", str(config))
    assert proc.returncode == 0 and "submitted" in proc.stdout, proc.stdout + proc.stderr
    try:
        yield work
    finally:
        cli(slurm, work, "cancel", "slurm-limit")


def test_pipeline_over_two_slurm_nodes_equals_the_reference(slurm, tmp_path: Path, tiny_models) -> None:  # noqa: ANN001
    config = write_experiment(tmp_path / "e.yaml", "{builtin: tiny-llama}", "{engine: [reference, pipeline], pp: [1, 2]}")
    # DeepSpeed AutoTP over the two nodes, in the same experiment folder (the same name), from a second file
    tensor = write_experiment(tmp_path / "tp.yaml", "{builtin: tiny-llama}", "{engine: deepspeed, tp: 2}")
    proc = cli(slurm, tmp_path, "submit", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("submitted") == 3
    proc = cli(slurm, tmp_path, "submit", str(tensor))
    assert proc.returncode == 0 and proc.stdout.count("submitted") == 1, proc.stdout + proc.stderr
    watched = cli(slurm, tmp_path, "status", "slurm-tiny", "--watch", "--interval", "2")  # returns once all ended
    assert watched.returncode == 0 and "every run has ended" in watched.stdout, watched.stdout + watched.stderr
    wait_for_jobs(slurm, tmp_path, "slurm-tiny")
    rows = status_rows(slurm, tmp_path, "slurm-tiny")
    out = tmp_path / "outputs" / "slurm-tiny"
    assert rows == {r: ("COMPLETED", "ok") for r in ("deepspeed-tp2-b4-fp32", "pipeline-pp1-b4-mb1-fp32",
                                                      "pipeline-pp2-b4-mb1-fp32", "reference-b4-fp32")}, \
        f"{rows}\n{job_logs(out)}"
    reference = completions(out / "reference-b4-fp32")
    assert len(reference) == 20
    assert completions(out / "pipeline-pp2-b4-mb1-fp32") == reference
    assert completions(out / "pipeline-pp1-b4-mb1-fp32") == reference
    assert completions(out / "deepspeed-tp2-b4-fp32") == reference
    run_json = json.loads((out / "pipeline-pp2-b4-mb1-fp32" / "run.json").read_text())
    assert run_json["runtime"]["env"]["SLURM_JOB_NUM_NODES"] == "2", "PP=2 ran as one task on each of 2 nodes"
    again = cli(slurm, tmp_path, "submit", str(config))
    assert again.returncode == 0 and "submitted" not in again.stdout and again.stdout.count("done") == 3
    assert cli(slurm, tmp_path, "collect", "slurm-tiny").returncode == 0
    accounting = json.loads((out / "pipeline-pp2-b4-mb1-fp32" / "slurm.json").read_text())
    assert accounting["State"] == "COMPLETED" and accounting["ExitCode"] == "0:0"


def test_failed_run_is_reported_and_only_it_is_resubmitted(slurm, tmp_path: Path, tiny_models) -> None:  # noqa: ANN001
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_models["tiny-llama"], model_dir)
    model = f"{{path: {model_dir}}}"
    config = write_experiment(tmp_path / "e.yaml", model, "{engine: reference}")
    assert cli(slurm, tmp_path, "submit", str(config)).returncode == 0
    wait_for_jobs(slurm, tmp_path, "slurm-tiny")
    # The model folder vanishes from the "compute nodes"; the new pipeline run must fail there.
    shutil.move(model_dir, tmp_path / "elsewhere")
    config = write_experiment(tmp_path / "e.yaml", model, "{engine: [reference, pipeline], pp: 2}")
    proc = cli(slurm, tmp_path, "submit", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "done  reference-b4-fp32" in proc.stdout and proc.stdout.count("submitted") == 1
    wait_for_jobs(slurm, tmp_path, "slurm-tiny")
    failed = tmp_path / "outputs" / "slurm-tiny" / "pipeline-pp2-b4-mb1-fp32"
    assert status_rows(slurm, tmp_path, "slurm-tiny")["pipeline-pp2-b4-mb1-fp32"] == ("FAILED", "failed")
    summary = json.loads((failed / "summary.json").read_text())
    assert summary["status"] == "failed" and str(model_dir) in summary["error"]
    assert str(model_dir) in (failed / "rank_0.log").read_text()
    shutil.move(tmp_path / "elsewhere", model_dir)
    proc = cli(slurm, tmp_path, "submit", str(config))
    assert "done  reference-b4-fp32" in proc.stdout and "resubmitted  pipeline-pp2-b4-mb1-fp32" in proc.stdout
    wait_for_jobs(slurm, tmp_path, "slurm-tiny")
    # status takes the experiment file too, as plan and submit do
    assert status_rows(slurm, tmp_path, str(config))["pipeline-pp2-b4-mb1-fp32"] == ("COMPLETED", "ok")


def test_cancel_stops_a_running_job(slurm, tmp_path: Path, tiny_models) -> None:  # noqa: ANN001
    config = write_experiment(tmp_path / "e.yaml", "{builtin: tiny-gpt2}", "{engine: pipeline, pp: 2}",
                              "generation: {max_new_tokens: 2000}")
    assert cli(slurm, tmp_path, "submit", str(config)).returncode == 0
    run_dir = tmp_path / "outputs" / "slurm-tiny" / "pipeline-pp2-b4-mb1-fp32"

    def generating() -> bool:  # both ranks have loaded their stage
        logs = [run_dir / f"rank_{r}.log" for r in (0, 1)]
        return all(log.exists() and "loaded layers" in log.read_text() for log in logs)

    deadline = time.monotonic() + 120
    while not generating() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    proc = cli(slurm, tmp_path, "cancel", "slurm-tiny")
    assert proc.returncode == 0 and "cancelled: " in proc.stdout and "nothing" not in proc.stdout, proc.stdout
    wait_for_jobs(slurm, tmp_path, "slurm-tiny", timeout=60)
    slurm_state, bundle = status_rows(slurm, tmp_path, "slurm-tiny")["pipeline-pp2-b4-mb1-fp32"]
    assert slurm_state == "CANCELLED" and bundle == "cancelled", bundle


def test_a_dead_rank_fails_the_slurm_job_and_is_named(slurm, tmp_path: Path, tiny_models) -> None:  # noqa: ANN001
    from conftest import rank_pid, wait_for_first_completion

    # 20 batches of one prompt: the first completion comes within seconds and the run goes on for minutes
    config = write_experiment(tmp_path / "e.yaml", "{builtin: tiny-gpt2}", "{engine: pipeline, pp: 2, timeout_s: 20}",
                              "generation: {max_new_tokens: 300}\nbatch_size: 1")
    assert cli(slurm, tmp_path, "submit", str(config)).returncode == 0
    run_dir = tmp_path / "outputs" / "slurm-tiny" / "pipeline-pp2-b1-mb1-fp32"
    wait_for_first_completion(run_dir, timeout=120)
    victim = rank_pid(run_dir, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    wait_for_jobs(slurm, tmp_path, "slurm-tiny", timeout=60)
    assert status_rows(slurm, tmp_path, "slurm-tiny")["pipeline-pp2-b1-mb1-fp32"] == ("FAILED", "failed")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dead_ranks"] == [1] and "rank(s) [1] died" in summary["error"]
    assert (run_dir / "completions.jsonl").read_text().splitlines()


def test_a_serving_job_starts_the_server_runs_the_load_and_ends_ok(slurm, tmp_path: Path, tiny_models) -> None:  # noqa: ANN001
    """One job per load on the real local cluster: distinfer's server starts on the allocation (two stages: one rank
    on each node), the load runs from the first node, the server stops, and the bundle is finalized; the served
    tokens equal the offline reference's; the server asks for the job's API key, which no file holds."""
    config = tmp_path / "e.yaml"
    config.write_text(
        f"name: slurm-serving\nmodel: {{builtin: tiny-llama}}\nprompts: {REPO / 'prompts/correctness.jsonl'}\n"
        "generation: {max_new_tokens: 8}\nparallel: {engine: pipeline, pp: [1, 2]}\n"
        "scenario: {kind: serving, rate: inf, requests: 6, warmup_requests: 1}\n"
        "cluster: {profile: cpu, time: '00:10:00', env: {DISTINFER_HEAD_ADDR: 127.0.0.1}}\n")  # n1, n2 do not resolve
    proc = cli(slurm, tmp_path, "submit", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("submitted") == 3  # two layouts' loads and the offline reference
    wait_for_jobs(slurm, tmp_path, "slurm-serving")
    out = tmp_path / "outputs" / "slurm-serving"
    rows = status_rows(slurm, tmp_path, "slurm-serving")
    assert rows == {"pipeline-pp1-fp32-rateinf": ("COMPLETED", "ok"), "pipeline-pp2-fp32-rateinf": ("COMPLETED", "ok"),
                    "reference-b1-fp32": ("COMPLETED", "ok")}, f"{rows}\n{job_logs(out)}"
    reference = completions(out / "reference-b1-fp32")
    for name in ("pipeline-pp1-fp32-rateinf", "pipeline-pp2-fp32-rateinf"):
        served = out / name
        assert len((served / "requests.jsonl").read_text().splitlines()) == 7 and (served / "server.log").exists()
        assert completions(served) == reference[: len(completions(served))] and len(completions(served)) == 7
    assert json.loads((out / "pipeline-pp2-fp32-rateinf" / "summary.json").read_text())["world_size"] == 2
    # the job's API key (48 hex digits, new per job) asked of the load by the server is in no file of the bundle
    server_log = (out / "pipeline-pp1-fp32-rateinf" / "server.log").read_text()
    assert "API key required" in server_log, server_log
    key_like = re.compile(rb"\b[0-9a-f]{48}\b")
    assert not [p for p in out.rglob("*") if p.is_file() and key_like.search(p.read_bytes())], "a key in the bundle"


def test_a_serving_study_of_each_workload_runs_as_a_slurm_job(slurm, tmp_path: Path, tiny_models) -> None:  # noqa: ANN001
    """One serving experiment per `scenario.input` kind, all submitted at once to the real local cluster: each job
    reads its workload file where the experiment names it, ends ok, and the server's token counts equal the plan
    (text prompts within one token)."""
    workloads = REPO / "prompts" / "workloads"
    sample = str(workloads / "sharegpt-sample.json")
    kinds = {
        "synthetic": {"rate": 20, "synthetic": {"input_tokens": {"mean": 24, "spread": 0.5}, "output_tokens": 4}},
        "shared_prefix": {"rate": 20, "shared_prefix": {"groups": 2, "prefix_tokens": 32, "suffix_tokens": 8,
                                                        "output_tokens": 4}},
        "sharegpt": {"rate": 20, "sharegpt": {"file": sample, "max_input_tokens": 120, "max_output_tokens": 12}},
        "sessions": {"rate": 20, "api": "chat", "sessions": {"file": sample, "turns": 2, "think_time_s": 0.05,
                                                             "output_tokens": 4}},
        "trace": {"trace": {"file": str(workloads / "azure-sample.csv"), "time_scale": 0.5}},
    }
    for kind, section in kinds.items():
        config = experiment_file(
            tmp_path / f"{kind}.yaml", f"slurm-{kind.replace('_', '-')}", generation={"max_new_tokens": 8},
            parallel={"engine": "pipeline"}, reference="none",
            scenario={"kind": "serving", "requests": 6, "warmup_requests": 0, "ignore_eos": True, "input": kind,
                      **section},
            cluster={"profile": "cpu", "time": "00:10:00", "env": {"DISTINFER_HEAD_ADDR": "127.0.0.1"}})
        proc = cli(slurm, tmp_path, "submit", str(config))
        assert proc.returncode == 0 and proc.stdout.count("submitted") == 1, proc.stdout + proc.stderr
    # The server on one node, the load from both (scenario.client.nodes: 2), their records on one clock.
    two = experiment_file(
        tmp_path / "two.yaml", "slurm-two-clients", generation={"max_new_tokens": 8}, parallel={"engine": "pipeline"},
        reference="none", scenario={"kind": "serving", "rate": 40, "requests": 24, "warmup_requests": 1,
                                    "ignore_eos": True, "input": "synthetic", "client": {"nodes": 2},
                                    "synthetic": {"input_tokens": {"mean": 24, "spread": 0.5}, "output_tokens": 4}},
        cluster={"profile": "cpu", "time": "00:10:00", "env": {"DISTINFER_HEAD_ADDR": "127.0.0.1"}})
    assert cli(slurm, tmp_path, "submit", str(two)).returncode == 0
    for kind in kinds:
        name = f"slurm-{kind.replace('_', '-')}"
        wait_for_jobs(slurm, tmp_path, name)
        out = tmp_path / "outputs" / name
        rows = status_rows(slurm, tmp_path, name)
        assert list(rows.values()) == [("COMPLETED", "ok")], f"{kind}: {rows}\n{job_logs(out)}"
        run_dir = out / next(iter(rows))
        records = [json.loads(line) for line in (run_dir / "requests.jsonl").open()]
        assert len(records) >= 6 and all(r["status"] == 200 for r in records), (kind, records)
        for record in records:
            if kind != "sessions":
                assert abs(record["prompt_tokens"] - record["planned_input_tokens"]) <= (kind == "sharegpt"), record
            assert record["output_tokens"] == record["planned_output_tokens"], (kind, record)
        if kind == "sessions":
            assert max(r["turn"] for r in records) == 1, "second turns were asked"
    wait_for_jobs(slurm, tmp_path, "slurm-two-clients")
    out = tmp_path / "outputs" / "slurm-two-clients"
    rows = status_rows(slurm, tmp_path, "slurm-two-clients")
    assert list(rows.values()) == [("COMPLETED", "ok")], f"{rows}\n{job_logs(out)}"
    run_dir = out / next(iter(rows))
    records = [json.loads(line) for line in (run_dir / "requests.jsonl").open()]
    measured = sorted(r["index"] for r in records if not r["warmup"])
    assert measured == list(range(1, 25)) and all(r["status"] == 200 for r in records)
    summary = json.loads((run_dir / "summary.json").read_text())
    nodes = summary["client_nodes"]
    assert [(n["node"], n["requests"]) for n in nodes] == [(0, 12), (1, 12)], nodes
    assert len({n["name"] for n in nodes}) == 2, "each client node is a node of its own"
    # Both nodes are this machine: one clock, so the measured offset is within its uncertainty of 0.
    assert 0 < summary["clock_uncertainty_ms"] < 5 and abs(nodes[1]["offset_ms"]) <= nodes[1]["uncertainty_ms"] + 0.1
    # Server, both client nodes and the Slurm daemons share this machine's 2 cores: the median send is on time
    # (a p99 over 24 requests is their worst one, which a busy core can delay past the validity limit).
    assert summary["send_lag_s"]["p50"] < 0.005, summary["send_lag_s"]


def test_the_time_limit_ends_a_job_as_timeout_and_submit_reruns_it(slurm, time_limited: Path) -> None:  # noqa: ANN001
    """The job of `time_limited`: SIGTERM at the limit, the run `timeout` with the reason, the requests so far
    whole; `submit` again reruns it and keeps the timed-out attempt."""
    run_dir = time_limited / "outputs" / "slurm-limit" / TIMED
    wait_for_jobs(slurm, time_limited, "slurm-limit", timeout=180)
    assert status_rows(slurm, time_limited, "slurm-limit")[TIMED] == ("TIMEOUT", "timeout"), job_logs(run_dir.parent)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "timeout" and "the job's time limit" in summary["error"], summary
    records = [json.loads(line) for line in (run_dir / "requests.jsonl").read_text().splitlines()]
    assert 1 <= len(records) < 100 and all(r["status"] == 200 and r["output_tokens"] for r in records), records
    proc = cli(slurm, time_limited, "submit", str(time_limited / "e.yaml"))
    assert f"resubmitted  {TIMED}" in proc.stdout, proc.stdout + proc.stderr
    assert (run_dir / "attempts" / "1" / "summary.json").is_file(), "the timed-out attempt is kept"
    assert cli(slurm, time_limited, "cancel", "slurm-limit").returncode == 0
    wait_for_jobs(slurm, time_limited, "slurm-limit", timeout=60)
