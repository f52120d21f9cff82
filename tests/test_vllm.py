"""Engine vllm: the experiment file's mapping onto `vllm serve`, and real vLLM (its CPU build, in the environment
`make vllm-env` creates once) measured offline on this machine and served from a job on the real local Slurm
cluster, its greedy tokens equal to the reference's. Every vLLM server is stopped through its process group by
the run itself; the tests check that none is left and that its shared-memory files are gone."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import left_in_tmp

from bench.experiments import experiment_file
from distinfer.plan import expand, resolve_builtin_models
from distinfer.serving.vllm import PLAIN_CHAT_TEMPLATE, serve_command, server_env, thread_binding
from distinfer.slurm import render_sbatch
from distinfer.spec import SpecError, load_experiment

REPO = Path(__file__).resolve().parent.parent
PROMPTS = REPO / "prompts" / "correctness.jsonl"


def experiment(tmp_path: Path, body: str, name: str = "vllm-study") -> Path:
    return experiment_file(tmp_path / f"{name}.yaml", name, body=body)


def test_the_layout_precision_and_batch_become_vllm_arguments(tmp_path: Path) -> None:
    config = experiment(tmp_path, "parallel: {engine: [pipeline, vllm], pp: [1, 2], tp: [1, 2]}\nbatch_size: 8\n"
                        "vllm: {args: [--block-size, '32'], max_model_len: 256, env: {VLLM_CPU_KVCACHE_SPACE: '2'}}\n")
    runs = {r.run_id: r for r in expand(load_experiment(config), config)}
    assert {"vllm-pp1-b8-fp32", "vllm-pp2-b8-fp32", "vllm-pp1-tp2-b8-fp32", "vllm-pp2-tp2-b8-fp32",
            "reference-b8-fp32"} <= set(runs)
    run = runs["vllm-pp2-tp2-b8-fp32"]
    command = serve_command(run, "/venv/bin/python", 8000, cpu=True)
    assert command[:5] == ["/venv/bin/python", "-m", "vllm.entrypoints.cli.main", "serve", run.model_path]
    pairs = dict(zip(command, command[1:]))
    assert pairs["--pipeline-parallel-size"] == "2" and pairs["--tensor-parallel-size"] == "2"
    assert pairs["--dtype"] == "float32" and pairs["--max-num-seqs"] == "8" and pairs["--max-model-len"] == "256"
    assert pairs["--distributed-executor-backend"] == "mp" and command[-2:] == ["--block-size", "32"]
    assert "--enforce-eager" not in command, "vLLM's CPU pipeline runs compiled"
    assert "--enforce-eager" in serve_command(runs["vllm-pp1-b8-fp32"], "python3", 8000, cpu=True)
    assert "--enforce-eager" not in serve_command(runs["vllm-pp1-b8-fp32"], "python3", 8000, cpu=False)
    assert pairs["--chat-template"] == str(PLAIN_CHAT_TEMPLATE), "the tiny Llama has no chat template of its own"
    env = server_env(run, {"PATH": "/bin"}, [0, 1, 2, 3, 4, 5, 6, 7])
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,3|4,5|6,7" and env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert thread_binding(2, [0]) == "0|0", "more ranks than cores: they share"


@pytest.mark.parametrize(("body", "message"), [
    ("parallel: {engine: vllm}\nvllm: {args: [--tensor-parallel-size=2]}\n", "vllm.args"),
    ("parallel: {engine: pipeline}\nvllm: {args: [--block-size, '32']}\n", "only used by engine vllm"),
    ("parallel: {engine: vllm}\nmodel_dtype_is: x\n", "unknown field"),
    ("parallel: {engine: vllm}\nvllm: {args: [\"a\\nb\"]}\n", "vllm.args[0]"),
])
def test_bad_vllm_settings_are_named(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(SpecError, match=message.replace("[", r"\[")):
        load_experiment(experiment(tmp_path, body))


def test_int8_is_not_offered_to_vllm(tmp_path: Path) -> None:
    config = experiment(tmp_path, "parallel: {engine: vllm}\nmodel: {builtin: tiny-llama, dtype: [float32, int8]}\n",
                        name="int8")
    with pytest.raises(SpecError, match="model.dtype.*not vllm"):
        load_experiment(config)


def test_a_cpu_vllm_job_takes_one_node_and_a_gpu_one_a_server_per_node(tmp_path: Path) -> None:
    config = experiment(tmp_path, "parallel: {engine: vllm, pp: 2}\ncluster: {profile: cpu, nodes: 2}\n")
    exp = load_experiment(config)
    run = next(r for r in expand(exp, config) if r.engine == "vllm")
    script = render_sbatch(run, exp.cluster, exp.container, tmp_path / "run")
    assert "#SBATCH --nodes=1" in script and "-m distinfer.serving.vllm" in script
    gpu = tmp_path / "gpu.yaml"
    gpu.write_text(f"name: gpu\nmodel: {{builtin: tiny-llama, dtype: float16}}\nprompts: {PROMPTS}\n"
                   "parallel: {engine: vllm, pp: 2}\ncluster: {profile: t4-16gb, gpus_per_node: 1}\n")
    exp = load_experiment(gpu)
    run = next(r for r in expand(exp, gpu) if r.engine == "vllm")
    assert "#SBATCH --nodes=2" in render_sbatch(run, exp.cluster, exp.container, tmp_path / "run")


# -- real vLLM ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """vLLM's CPU build in .venv-vllm, created once by `make vllm-env` (about 2 minutes and 3.5 GB the first
    time; afterwards the target finds it made)."""
    made = subprocess.run(["make", "-s", "vllm-env"], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert made.returncode == 0, made.stdout + made.stderr
    return REPO / ".venv-vllm" / "bin" / "python"


def vllm_processes() -> set[int]:
    """PIDs of live processes running vLLM's command line or its distinfer starter."""
    found = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                args = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"vllm.entrypoints" in args or b"distinfer.serving.vllm" in args:
                found.add(int(proc.name))
    return found


def shm_files() -> set[Path]:
    return {*Path("/dev/shm").glob("vllm_dist_*"), *Path("/tmp").glob("vllm_dist_*")}


def completions(run_dir: Path) -> list[list[int]]:
    return [json.loads(line)["output_token_ids"] for line in (run_dir / "completions.jsonl").open()]


def test_vllm_offline_beside_the_pipeline_equals_the_reference(tmp_path: Path, vllm_python: Path, tiny_models) -> None:  # noqa: ANN001,E501
    """`engine: [pipeline, vllm]` with the defaults of everything else (reference: auto, batch_size 4): vLLM's run
    measures the same batches through `vllm serve`, its bundle has the same contract, its tokens equal the
    reference's, and the analysis puts both engines in one table."""
    before_processes, before_shm, before_tmp = vllm_processes(), shm_files(), left_in_tmp()
    config = experiment(tmp_path, "generation: {max_new_tokens: 12}\nparallel: {engine: [pipeline, vllm]}\n"
                        f"batch_size: 4\nvllm: {{python: {vllm_python}}}\n")
    proc = subprocess.run([sys.executable, "-m", "distinfer", "run", str(config), "--local", "--outputs",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=900)
    out = tmp_path / "out" / "vllm-study"
    log = (out / "vllm-pp1-b4-fp32" / "server.log")
    assert proc.returncode == 0, proc.stdout + proc.stderr + (log.read_text()[-3000:] if log.exists() else "")
    run = out / "vllm-pp1-b4-fp32"
    assert {"run.json", "summary.json", "completions.jsonl", "requests.jsonl", "server.log", "vllm.json"} <= \
        {p.name for p in run.iterdir()}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["output_tokens"] == 20 * 12 and summary["tpot_s"]["p50"] > 0
    assert summary["batch_size"] == 4 and summary["engine"] == "vllm"
    records = [json.loads(line) for line in (run / "requests.jsonl").open()]
    assert len(records) == 4 + 20 and sum(r["warmup"] for r in records) == 4, "one warm-up batch, then 5 batches"
    provenance = json.loads((run / "run.json").read_text())["provenance"]["vllm"]
    assert provenance["version"].startswith("0.32") and "--enforce-eager" in provenance["command"]
    assert provenance["command"][provenance["command"].index("--max-num-seqs") + 1] == "4"
    reference = completions(out / "reference-b4-fp32")
    assert len(reference) == 20 and completions(run) == reference == completions(out / "pipeline-pp1-b4-mb1-fp32")
    assert vllm_processes() <= before_processes, "the vLLM server and its engine process are stopped"
    assert shm_files() <= before_shm
    assert left_in_tmp() <= before_tmp, "vLLM's sockets went with the run's temporary folder"
    analysis = subprocess.run([sys.executable, "-m", "distinfer", "analyze", str(out), "--out", str(tmp_path / "a")],
                              capture_output=True, text=True, timeout=300)
    assert analysis.returncode == 0 and "0 problem(s)" in analysis.stdout, analysis.stdout + analysis.stderr
    import pandas as pd

    correctness = pd.read_csv(tmp_path / "a/vllm-study/correctness.csv").set_index("run_id")
    assert correctness.loc["vllm-pp1-b4-fp32", "exact_match_rate"] == 1.0
    runs = pd.read_csv(tmp_path / "a/vllm-study/results.csv")
    assert {"pipeline", "vllm", "reference"} <= set(runs["engine"])


def test_a_vllm_serving_job_on_slurm_serves_the_reference_tokens(slurm, tmp_path: Path, vllm_python: Path,  # noqa: ANN001
                                                                 tiny_models) -> None:  # noqa: ANN001
    """A serving job of engine vllm on the real local cluster: vLLM's CPU backend runs on one node (it has no
    multi-node launch on CPU), the load runs beside it, the job stops the server and ends ok; the served tokens
    equal the offline reference's."""
    before_processes, before_tmp = vllm_processes(), left_in_tmp()
    config = experiment(tmp_path, "generation: {max_new_tokens: 8}\nparallel: {engine: vllm}\n"
                        "scenario: {kind: serving, rate: 8, requests: 8, warmup_requests: 1}\n"
                        f"vllm: {{python: {vllm_python}}}\n"
                        "cluster: {profile: cpu, time: '00:10:00', nodes: 2, env: {DISTINFER_HEAD_ADDR: 127.0.0.1}}\n",
                        name="slurm-vllm")
    from test_slurm import cli, job_logs, status_rows, wait_for_jobs

    proc = cli(slurm, tmp_path, "submit", str(config))
    assert proc.returncode == 0 and proc.stdout.count("submitted") == 2, proc.stdout + proc.stderr
    wait_for_jobs(slurm, tmp_path, "slurm-vllm", timeout=600)
    out = tmp_path / "outputs" / "slurm-vllm"
    rows = status_rows(slurm, tmp_path, "slurm-vllm")
    assert rows == {"vllm-pp1-fp32-rate8": ("COMPLETED", "ok"), "reference-b1-fp32": ("COMPLETED", "ok")}, \
        f"{rows}\n{job_logs(out)}\n{(out / 'vllm-pp1-fp32-rate8' / 'server.log').read_text()[-3000:]}"
    served = out / "vllm-pp1-fp32-rate8"
    assert len((served / "requests.jsonl").read_text().splitlines()) == 9
    summary = json.loads((served / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["completed"] == 8 and summary["ttft_s"]["p50"] > 0
    reference = completions(out / "reference-b1-fp32")
    assert completions(served) == reference[: len(completions(served))] and len(completions(served)) == 9
    run_json = json.loads((served / "run.json").read_text())
    assert run_json["provenance"]["vllm"]["version"].startswith("0.32") and run_json["runtime"]["device"] == "cpu"
    assert vllm_processes() <= before_processes, "the job stopped vLLM's server"
    assert left_in_tmp() <= before_tmp, "vLLM's sockets went with the job's temporary folder"


@contextlib.contextmanager
def running_vllm(tmp_path: Path, vllm_python: Path, cores: set[int] | None = None) -> Iterator[str]:
    """vLLM's server for the tiny Llama as an engine-vllm run starts it (serve_command, server_env: the plain chat
    template included), on a free port in its own process group (on `cores` only, where given); stopped through
    the group."""
    from distinfer.net import free_port
    from distinfer.serving.runner import wait_healthy
    from distinfer.serving.vllm import leftovers, remove, stop_group

    config = experiment(tmp_path, "parallel: {engine: vllm}\nreference: none\nbatch_size: 16\n", name="served")
    run = resolve_builtin_models(expand(load_experiment(config), config))[0]
    port, before = free_port(), leftovers()
    command = serve_command(run, str(vllm_python), port)
    with (tmp_path / "vllm.log").open("w") as log:
        env = server_env(run, os.environ, sorted(cores or os.sched_getaffinity(0)))
        if cores:
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, sorted(cores)))
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                  preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
        try:
            url = f"http://127.0.0.1:{port}"
            try:
                wait_healthy(url, server.poll, 300)
            except RuntimeError as exc:
                raise AssertionError(f"{exc}\n{(tmp_path / 'vllm.log').read_text()[-3000:]}") from None
            yield url
        finally:
            stop_group(server)
            remove(leftovers() - before)


def test_each_workload_reaches_vllm_with_its_planned_token_counts(tmp_path: Path, vllm_python: Path,  # noqa: ANN001
                                                                  tiny_models) -> None:  # noqa: ANN001
    """Every `scenario.input` kind sent to one vLLM server (its CPU build, prefix caching on, as by default), as a
    user's endpoint runs (synthetic prompts as text through the chat API; token-id prompts by the shared prefix): the prompt tokens vLLM reports equal the planned ones (token ids exactly, ShareGPT text
    within one token) and each request its planned output; the shared-prefix load hits vLLM's prefix cache (its
    /metrics, in the summary: it caches whole blocks, 128 tokens on CPU); a session's turn holds the questions and vLLM's answers so far (chat API, the plain
    template); the trace is sent on its own times (2 ms p99)."""
    from distinfer.models.loading import load_tokenizer
    from distinfer.serving.sharegpt import read_conversations
    from distinfer.serving.template import plain_template
    from distinfer.serving.traces import read_trace

    before_processes = vllm_processes()
    workloads = REPO / "prompts" / "workloads"
    sample = workloads / "sharegpt-sample.json"
    kinds = {
        "shared_prefix": {"shared_prefix": {"groups": 2, "prefix_tokens": 300, "suffix_tokens": 8, "output_tokens": 4}},
        "sharegpt": {"sharegpt": {"file": str(sample), "max_input_tokens": 120, "max_output_tokens": 12}},
        "synthetic_chat": {"input": "synthetic", "api": "chat", "synthetic": {"input_tokens": 30, "output_tokens": 5}},
        "sessions": {"api": "chat", "rate": 20, "requests": 3, "sessions": {
            "file": str(sample), "turns": {"mean": 3, "min": 2, "max": 3}, "think_time_s": 0.05, "output_tokens": 6}},
        "trace": {"requests": 120, "trace": {"file": str(workloads / "azure-sample.csv"), "time_scale": 0.25}},
    }
    out = tmp_path / "out"
    # the server on the last core, the client on the others, as on hosts of their own: vLLM's CPU threads spin
    # while they wait, and a client sharing their core starts requests late
    cores = sorted(os.sched_getaffinity(0))
    server_cores, client_cores = {cores[-1]}, set(cores[:-1] or cores)
    with running_vllm(tmp_path, vllm_python, server_cores) as url:
        for kind, section in kinds.items():
            scenario = {"kind": "serving", "rate": 40, "requests": 12, "warmup_requests": 0, "ignore_eos": True,
                        "input": kind, **section}
            if kind == "trace":
                scenario.pop("rate")
            config = experiment_file(tmp_path / f"{kind}.yaml", kind, scenario=scenario,
                                     endpoint={"url": url, "model": "tiny-llama"})
            proc = subprocess.run([sys.executable, "-m", "distinfer", "run", str(config), "--local", "--outputs",
                                   str(out)], capture_output=True, text=True, timeout=300,
                                  preexec_fn=lambda: os.sched_setaffinity(0, client_cores))
            assert proc.returncode == 0, proc.stdout + proc.stderr + (tmp_path / "vllm.log").read_text()[-3000:]
    assert vllm_processes() <= before_processes
    runs = {kind: next(p for p in (out / kind).iterdir() if p.is_dir()) for kind in kinds}
    records = {kind: [json.loads(line) for line in (run / "requests.jsonl").open()] for kind, run in runs.items()}
    summaries = {kind: json.loads((run / "summary.json").read_text()) for kind, run in runs.items()}
    for kind in ("shared_prefix", "sharegpt", "synthetic_chat", "trace"):
        assert summaries[kind]["status"] == "ok" and len(records[kind]) == kinds[kind].get("requests", 12)
        for record in records[kind]:
            assert abs(record["prompt_tokens"] - record["planned_input_tokens"]) <= (kind == "sharegpt"), record
            assert record["output_tokens"] == record["planned_output_tokens"], (kind, record)
    cache = summaries["shared_prefix"]["prefix_cache"]
    assert cache["hit_tokens"] > 0 and 0 < summaries["shared_prefix"]["prefix_cache_hit_rate"] <= 1, cache
    assert {r["group"] for r in records["shared_prefix"]} == {0, 1}
    analysis = subprocess.run([sys.executable, "-m", "distinfer", "analyze", str(out / "shared_prefix"), "--out",
                               str(tmp_path / "a")], capture_output=True, text=True, timeout=300)
    assert analysis.returncode == 0, analysis.stdout + analysis.stderr
    import pandas as pd

    served = pd.read_csv(tmp_path / "a/shared_prefix/serving.csv")
    assert served["prefix_cache_hit_rate"].iloc[0] == pytest.approx(cache["hit_rate"]), "the hit rate is tabled"

    tokenizer = load_tokenizer(tiny_models["tiny-llama"])
    questions = {c.id: [q for q, _ in c.exchanges] for c in read_conversations(sample)}
    by_session: dict[int, list[dict]] = {}
    for record in records["sessions"]:
        by_session.setdefault(record["session"], []).append(record)
    assert len(by_session) == 3 and max(len(turns) for turns in by_session.values()) >= 2
    for turns in by_session.values():
        turns.sort(key=lambda r: r["turn"])
        asked, history = questions[turns[0]["prompt_id"].rsplit("-t", 1)[0]], []
        for k, record in enumerate(turns):
            assert record["turn"] == k and record["status"] == 200 and record["output_tokens"] == 6, record
            history.append({"role": "user", "content": asked[k]})
            assert record["prompt_tokens"] == len(tokenizer(plain_template(history))["input_ids"]), (k, history)
            history.append({"role": "assistant", "content": record["text"]})

    trace = read_trace(workloads / "azure-sample.csv")[:120]
    sent = sorted(records["trace"], key=lambda r: r["index"])
    assert [round(r["planned_s"] - sent[0]["planned_s"], 6) for r in sent] == [round(t.at_s / 4, 6) for t in trace]
    lags = sorted(r["sent_s"] - r["planned_s"] for r in sent)
    assert lags[min(len(lags) - 1, int(0.99 * len(lags)))] < 0.002, lags


def test_a_missing_vllm_environment_fails_the_run_with_its_reason(tmp_path: Path, tiny_models) -> None:  # noqa: ANN001
    """No vLLM where the experiment says: the run fails within seconds, its summary and server.log say why and
    what to do, and nothing is left running."""
    config = experiment(tmp_path, "parallel: {engine: vllm}\nreference: none\nvllm: {python: /nonexistent/python}\n")
    proc = subprocess.run([sys.executable, "-m", "distinfer", "run", str(config), "--local", "--outputs",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    run = tmp_path / "out" / "vllm-study" / "vllm-pp1-b1-fp32"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "server.log" in summary["error"], summary
    assert "make vllm-env" in (run / "server.log").read_text()
