"""Serving runs against an OpenAI-compatible endpoint: the schedule, the metrics on known numbers, and real runs of
the load generator against a real HTTP server (distinfer's mock server streaming instantly, in its own process)."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from distinfer.serving.metrics import peak_concurrency, summarize
from distinfer.serving.records import RequestRecord
from distinfer.serving.schedule import arrival_offsets

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.endpoint import free_port, serve_instant  # noqa: E402


def test_arrivals_are_seeded_and_have_the_rate_and_burstiness_asked_for() -> None:
    poisson = arrival_offsets(20000, rate=50.0, seed=7)
    assert poisson == arrival_offsets(20000, rate=50.0, seed=7) and poisson != arrival_offsets(20000, 50.0, seed=8)
    gaps = [b - a for a, b in zip(poisson, poisson[1:])]
    assert poisson[0] == 0.0 and statistics.mean(gaps) == pytest.approx(1 / 50, rel=0.03)
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, rel=0.05)  # exponential gaps
    bursty = arrival_offsets(20000, rate=50.0, burstiness=0.25, seed=7)
    bursty_gaps = [b - a for a, b in zip(bursty, bursty[1:])]
    assert statistics.mean(bursty_gaps) == pytest.approx(1 / 50, rel=0.05)
    assert statistics.stdev(bursty_gaps) / statistics.mean(bursty_gaps) == pytest.approx(2.0, rel=0.08)  # 1/sqrt(k)
    assert arrival_offsets(5, math.inf) == [0.0] * 5
    assert arrival_offsets(4, 8.0, math.inf, seed=3) == [0.0, 0.125, 0.25, 0.375], "constant arrivals"
    with pytest.raises(ValueError):
        arrival_offsets(5, 0.0)


def test_constant_arrivals_are_a_scenarios_choice_without_burstiness(tmp_path) -> None:  # noqa: ANN001
    from bench.experiments import experiment_file, run_specs
    from distinfer.spec import SpecError

    config = experiment_file(tmp_path / "c.yaml", "c", scenario={"kind": "serving", "rate": 4, "arrivals": "constant"})
    assert next(r for r in run_specs(config) if r.scenario).scenario.gap_shape == math.inf
    config = experiment_file(tmp_path / "g.yaml", "g", scenario={"kind": "serving", "rate": 4, "arrivals": "gamma",
                                                                  "burstiness": 0.5})
    assert next(r for r in run_specs(config) if r.scenario).scenario.gap_shape == 0.5
    config = experiment_file(tmp_path / "b.yaml", "b", scenario={"kind": "serving", "rate": 4, "arrivals": "constant",
                                                                  "burstiness": 2})
    with pytest.raises(SpecError, match="burstiness needs arrivals: gamma"):
        run_specs(config)


def _record(index: int, sent: float, tokens: list[float], warmup: bool = False, error: str | None = None) -> RequestRecord:  # noqa: E501
    return RequestRecord(index, f"p{index}", planned_s=sent, sent_s=sent, token_times_s=tokens,
                         end_s=tokens[-1] if tokens else sent + 0.1, output_tokens=len(tokens),
                         status=500 if error else 200, error=error, warmup=warmup)


def test_serving_metrics_on_known_numbers() -> None:
    """vLLM's definitions: TTFT from the send, TPOT = (E2E - TTFT) / (tokens - 1), ITL pooled, goodput the
    requests meeting every SLO per second of the measured span."""
    records = [
        _record(0, 0.0, [0.5, 0.6], warmup=True),  # not measured
        _record(1, 1.0, [1.2, 1.3, 1.4]),  # TTFT 0.2, TPOT 0.1, E2E 0.4
        _record(2, 1.5, [2.0, 2.4, 2.8]),  # TTFT 0.5, TPOT 0.4, E2E 1.3
        _record(3, 2.0, [], error="HTTP 500"),
    ]
    s = summarize(records, slo={"ttft": 0.3, "tpot": 0.2}, offered_rate=2.0)
    assert (s["requests"], s["completed"], s["errors"]) == (3, 2, 1)
    assert s["duration_s"] == pytest.approx(1.8)  # first send 1.0 to last end 2.8
    assert s["request_throughput"] == pytest.approx(2 / 1.8) and s["output_tokens"] == 6
    assert s["ttft_s"]["mean"] == pytest.approx(0.35) and s["ttft_s"]["p50"] == pytest.approx(0.35)
    assert s["tpot_s"]["p99"] == pytest.approx(0.1 + 0.3 * 0.99)
    assert sorted(round(v, 3) for v in [0.1, 0.1, 0.4, 0.4]) == [0.1, 0.1, 0.4, 0.4]
    assert s["itl_s"]["mean"] == pytest.approx(0.25)
    assert s["goodput"] == pytest.approx(1 / 1.8) and s["slo_attained"] == 0.5
    assert s["achieved_rate"] == pytest.approx(2 / 1.0)  # three sends over one second
    assert s["error_examples"] == ["HTTP 500"]
    assert peak_concurrency([_record(1, 0.0, [1.0]), _record(2, 0.5, [2.0]), _record(3, 1.0, [1.5])]) == 2


def _experiment(folder: Path, url: str, scenario: str, extra: str = "") -> Path:
    config = folder / "e.yaml"
    config.write_text(f"name: ep\nmodel: {{builtin: tiny-llama}}\nprompts: {REPO / 'prompts/correctness.jsonl'}\n"
                      f"generation: {{max_new_tokens: 8}}\nscenario: {scenario}\n"
                      f"endpoint: {{url: '{url}', model: mock{extra}}}\n")
    return config


def _run(config: Path, outputs: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distinfer", "run", str(config), "--local", "--outputs", str(outputs)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_a_rate_sweep_against_an_endpoint_writes_requests_and_serving_figures(tmp_path: Path) -> None:
    with serve_instant() as server:
        url = server.url
        config = _experiment(tmp_path, url, "{kind: serving, rate: [20, inf], requests: 30, warmup_requests: 2, "
                                            "slo: {ttft: 500ms, e2e: 2s}}", ", api_key_env: DISTINFER_TEST_KEY")
        env = {**os.environ, "DISTINFER_TEST_KEY": "sk-test-do-not-write-7f3a"}
        proc = _run(config, tmp_path / "out", env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for run_id, offered in (("endpoint-rate20", 20.0), ("endpoint-rateinf", "inf")):
        bundle = tmp_path / "out" / "ep" / run_id
        records = [json.loads(line) for line in (bundle / "requests.jsonl").read_text().splitlines()]
        assert len(records) == 32 and sum(r["warmup"] for r in records) == 2
        for r in records:
            assert r["status"] == 200 and r["output_tokens"] == 8 and len(r["token_times_s"]) == 8
            assert r["sent_s"] >= r["planned_s"] - 1e-6 and r["finish_reason"] == "length"
        summary = json.loads((bundle / "summary.json").read_text())
        assert summary["status"] == "ok" and summary["completed"] == 30 and summary["errors"] == 0
        assert summary["offered_rate"] == offered and summary["goodput"] == pytest.approx(summary["request_throughput"])
        assert set(summary["ttft_s"]) == {"mean", "std", "p50", "p90", "p95", "p99"}
        assert summary["output_tokens_per_s"] > 0 and summary["peak_concurrency"] >= 1
    assert json.loads((tmp_path / "out/ep/endpoint-rate20/summary.json").read_text())["achieved_rate"] == \
        pytest.approx(20, rel=0.5)
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert "sk-test-do-not-write-7f3a" not in path.read_text(errors="replace"), f"the key leaked into {path}"
    analysis = subprocess.run([sys.executable, "-m", "distinfer", "analyze", str(tmp_path / "out/ep"), "--out",
                               str(tmp_path / "analysis")], capture_output=True, text=True, timeout=300)
    assert analysis.returncode == 0, analysis.stderr
    out = tmp_path / "analysis" / "ep"
    import pandas as pd

    table = pd.read_csv(out / "serving.csv")
    assert list(pd.to_numeric(table["load_value"])) == [20.0, math.inf]
    knee = pd.read_csv(out / "serving_knee.csv")
    # the instant server meets any SLO; at rate inf the client alone may be what limits (its CPU saturated): then
    # that load is invalid and the knee is the highest valid one
    everything_at_once_valid = bool(table["valid"].iloc[1])
    assert len(knee) == 1 and str(knee["highest_load_meeting_slo"].iloc[0]) == ("inf" if everything_at_once_valid
                                                                                else "20")
    assert {p.stem for p in (out / "plots").glob("*.svg")} == {"latency_throughput", "goodput", "workload"}
    assert not (out / "strong_scaling.csv").exists() and not (out / "correctness.csv").exists()
    svg = (out / "plots" / "goodput.svg").read_text()
    assert "TTFT ≤ 500 ms" in svg and "E2E ≤ 2000 ms" in svg and "inf" in svg
    report = (out / "report.md").read_text()
    assert report.index("Serving: each layout") < report.index("Runs and their states") or "Serving" in report


def test_a_closed_loop_keeps_the_users_busy(tmp_path: Path) -> None:
    with serve_instant() as server:
        url = server.url
        proc = _run(_experiment(tmp_path, url, "{kind: serving, concurrency: [1, 4], requests: 40}"), tmp_path / "out")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one = json.loads((tmp_path / "out/ep/endpoint-c1/summary.json").read_text())
    four = json.loads((tmp_path / "out/ep/endpoint-c4/summary.json").read_text())
    assert one["peak_concurrency"] == 1 and 2 <= four["peak_concurrency"] <= 4
    assert one["completed"] == four["completed"] == 40


def test_an_unreachable_endpoint_fails_the_run_clearly_and_soon(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = _run(_experiment(tmp_path, f"http://127.0.0.1:{free_port()}", "{kind: serving, rate: 5, requests: 5}"),
                tmp_path / "out")
    assert time.monotonic() - start < 60
    assert proc.returncode == 1
    summary = json.loads((tmp_path / "out/ep/endpoint-rate5/summary.json").read_text())
    assert summary["status"] == "failed" and "cannot reach http://127.0.0.1" in summary["error"]
    assert "cannot reach" in proc.stdout


def _mid_run(config: Path, outputs: Path, run_id: str, act: Callable[[subprocess.Popen], None],
             lines: int = 20) -> tuple[int, str]:
    """`distinfer run CONFIG --local` in its own process; once its requests.jsonl holds `lines` lines, `act(run)`;
    then waits for the run's end (killing it after 2 minutes): its exit status and output."""
    run = subprocess.Popen([sys.executable, "-m", "distinfer", "run", str(config), "--local", "--outputs",
                            str(outputs)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        requests = outputs / "ep" / run_id / "requests.jsonl"
        deadline = time.monotonic() + 60
        while (not requests.exists() or len(requests.read_text().splitlines()) < lines) and time.monotonic() < deadline:
            time.sleep(0.02)
        act(run)
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    return run.returncode, out + err


def test_a_server_killed_mid_run_fails_the_run_and_keeps_the_requests_so_far(tmp_path: Path) -> None:
    with serve_instant() as server:
        config = _experiment(tmp_path, server.url, "{kind: serving, rate: 20, requests: 100, timeout_s: 20}")
        code, output = _mid_run(config, tmp_path / "out", "endpoint-rate20", lambda _: os.kill(server.pid,
                                                                                                 signal.SIGKILL))
    assert code == 1, output
    summary = json.loads((tmp_path / "out/ep/endpoint-rate20/summary.json").read_text())
    records = _records(tmp_path / "out/ep/endpoint-rate20/requests.jsonl")
    assert summary["status"] == "failed" and "requests failed" in summary["error"]
    assert sum(r["status"] == 200 for r in records) >= 19 and any(r["error"] for r in records)
    assert summary["completed"] >= 19, "the figures of the requests that succeeded stay"


def _post(url: str, body: dict) -> dict:
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_a_client_that_falls_behind_is_seen_from_the_intended_time_and_marked_invalid() -> None:
    """Open loop at 40/s for 3 s against the instant mock server, the client's event loop blocked for 2 s after
    0.5 s (as a GC pause or a busy core would): the requests scheduled in those seconds leave late, so TTFT from
    the intended time shows the wait and TTFT from the send does not; the load is invalid for its dispatch lag."""
    import asyncio

    from distinfer.serving.client import Request, Target, run_load
    from distinfer.serving.metrics import summarize, validity

    requests = [Request(i, f"p{i}", [1, 2, 3], 4, warmup=i == 0) for i in range(121)]

    async def blocked_load() -> list:
        asyncio.get_running_loop().call_later(0.5, time.sleep, 2.0)
        return await run_load(Target(server.url, "mock"), requests, lambda record: None, rate=40.0)

    with serve_instant() as server:
        records = asyncio.run(blocked_load())
    figures = summarize(records, None, 40.0)
    assert figures["completed"] == 120 and figures["send_lag_s"]["max"] >= 1.8
    assert figures["ttft_intended_s"]["p99"] >= 1.5 and figures["ttft_s"]["p99"] < 0.1, figures["ttft_s"]
    verdict = validity(figures, open_loop=True, max_lag_s=0.005, cpu_share=None)
    assert not verdict["valid"] and any("dispatch lag p99" in r for r in verdict["invalid_reasons"]), verdict


def test_a_server_stall_shows_in_both_ttfts_and_the_load_stays_valid(tmp_path: Path) -> None:
    """The same load as a user runs it (`distinfer run`, an endpoint experiment) while the mock server holds every
    token for 1 s: the requests sent then wait for their first token, so both TTFTs show the stall; the client
    sent on time, and the load is valid. The analysis tables both and the client's verdict."""
    with serve_instant() as server:
        config = _experiment(tmp_path, server.url, "{kind: serving, rate: 40, requests: 120, warmup_requests: 1, "
                                                   "slo: {ttft: 200ms}}")
        code, output = _mid_run(config, tmp_path / "out", "endpoint-rate40",
                                lambda _: _post(server.url + "/mock/stall", {"seconds": 1.0}))
    assert code == 0, output
    summary = json.loads((tmp_path / "out/ep/endpoint-rate40/summary.json").read_text())
    assert summary["valid"] and summary["invalid_reasons"] == [], summary["invalid_reasons"]
    assert summary["ttft_s"]["p99"] >= 0.5 and summary["ttft_intended_s"]["p99"] >= 0.5
    assert summary["send_lag_s"]["p99"] < 0.005 and 0 <= summary["client_cpu_share"] < 0.95
    assert summary["scheduled_rate"] == pytest.approx(40, rel=0.3)
    analysis = subprocess.run([sys.executable, "-m", "distinfer", "analyze", str(tmp_path / "out/ep"), "--out",
                               str(tmp_path / "a")], capture_output=True, text=True, timeout=300)
    assert analysis.returncode == 0, analysis.stdout + analysis.stderr
    import pandas as pd

    table = pd.read_csv(tmp_path / "a/ep/serving.csv")
    assert table["valid"].tolist() == [True] and table["ttft_intended_p99_s"].iloc[0] >= 0.5


def test_an_invalid_load_is_never_the_knee() -> None:
    import pandas as pd

    from distinfer.analysis.tables import serving_knee

    layout = {"engine": "endpoint", "served_model": "m", "world_size": 1, "microbatches": 1, "load": "rate"}
    rows = [{**layout, "load_value": v, "slo_attained": 1.0, "valid": ok, "achieved_rate": float(v), "goodput": 1.0,
             "ttft_p99_s": 0.1, "tpot_p99_s": 0.01} for v, ok in (("2", True), ("4", True), ("8", False))]
    knee = serving_knee(pd.DataFrame(rows))
    assert knee["highest_load_meeting_slo"].tolist() == ["4"] and knee["loads_invalid"].tolist() == [1]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_client_processes_send_the_requests_one_would(tmp_path: Path) -> None:
    """`client.processes: 2` against the mock server: the same requests (ids, prompt lengths) at the same offsets
    from the schedule's start as one process, all in one requests.jsonl, each process's CPU share reported, and
    the load valid. As on hosts of their own, the server runs on the last core and the client on the others."""
    cores = sorted(os.sched_getaffinity(0))
    with serve_instant() as server:
        os.sched_setaffinity(server.pid, {cores[-1]})
        for processes in (1, 2):
            (tmp_path / f"p{processes}").mkdir()
            config = _experiment(tmp_path / f"p{processes}", server.url,
                                 "{kind: serving, rate: 100, requests: 150, warmup_requests: 2, input: synthetic, "
                                 "synthetic: {input_tokens: {mean: 20, spread: 0.5}, output_tokens: 4}, "
                                 f"client: {{processes: {processes}}}}}")
            proc = subprocess.run([sys.executable, "-m", "distinfer", "run", str(config), "--local", "--outputs",
                                   str(tmp_path / f"out{processes}")], capture_output=True, text=True, timeout=120,
                                  preexec_fn=lambda: os.sched_setaffinity(0, set(cores[:-1] or cores)))
            assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = {p: _records(tmp_path / f"out{p}/ep/endpoint-rate100/requests.jsonl") for p in (1, 2)}

    def shape(records: list[dict]) -> list[tuple]:
        measured = sorted((r for r in records if not r["warmup"]), key=lambda r: r["index"])
        start = measured[0]["planned_s"]
        return [(r["index"], r["prompt_id"], r["prompt_tokens"], round(r["planned_s"] - start, 6)) for r in measured]

    assert len(runs[2]) == 152 and all(r["status"] == 200 for r in runs[2])
    assert shape(runs[1]) == shape(runs[2])
    summary = json.loads((tmp_path / "out2/ep/endpoint-rate100/summary.json").read_text())
    assert summary["completed"] == 150 and 0 < summary["client_cpu_share"] < 1 and summary["client_processes"] == 2
    assert summary["valid"], (summary["invalid_reasons"], summary["send_lag_s"])


def test_a_killed_client_process_loses_only_its_unfinished_requests(tmp_path: Path) -> None:
    """Two client processes, one killed mid-load: the other's requests all succeed, the killed one's finished
    requests stay, and each of its unfinished ones is in requests.jsonl as failed, naming the worker's end."""
    import psutil

    with serve_instant(itl_ms=20) as server:
        config = _experiment(tmp_path, server.url, "{kind: serving, rate: 20, requests: 80, warmup_requests: 1, "
                                                   "client: {processes: 2}}")

        def kill_a_worker(run: subprocess.Popen) -> None:
            workers = [p for p in psutil.Process(run.pid).children(recursive=True)
                       if "spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())]
            assert len(workers) == 2, [p.cmdline() for p in workers]
            workers[0].kill()

        code, output = _mid_run(config, tmp_path / "out", "endpoint-rate20", kill_a_worker)
    assert code == 1, output
    records = [r for r in _records(tmp_path / "out/ep/endpoint-rate20/requests.jsonl") if not r["warmup"]]
    assert sorted(r["index"] for r in records) == list(range(1, 81)), "every request is in requests.jsonl, once"
    failed = [r for r in records if r["status"] != 200]
    assert failed and all("client worker process" in r["error"] and "signal 9" in r["error"] for r in failed)
    assert len({r["index"] % 2 for r in failed}) == 1, "only the killed worker's share failed"
    assert sum(r["status"] == 200 for r in records) >= 40, "the other worker's share and the finished ones stay"
    summary = json.loads((tmp_path / "out/ep/endpoint-rate20/summary.json").read_text())
    assert summary["status"] == "failed" and f"{len(failed)} of 80 requests failed" in summary["error"]


def test_client_nodes_outside_a_slurm_job_fail_the_run_at_once_and_say_why(tmp_path: Path, tiny_models) -> None:  # noqa: ANN001
    """`client.nodes: 2` run here: the run fails before it sends anything, saying to submit it; with an endpoint
    the experiment file is refused (client nodes are nodes of the run's own job)."""
    from bench.experiments import experiment_file, run_local

    config = experiment_file(tmp_path / "e.yaml", "cn", generation={"max_new_tokens": 4}, reference="none",
                             scenario={"kind": "serving", "rate": 10, "requests": 4, "client": {"nodes": 2}})
    proc = run_local(config, "--outputs", str(tmp_path / "out"), timeout=120)
    assert proc.returncode != 0
    summary = json.loads((tmp_path / "out/cn/pipeline-pp1-fp32-rate10/summary.json").read_text())
    assert summary["status"] == "failed" and "client.nodes: 2" in summary["error"], summary
    assert "distinfer submit" in summary["error"] and not (tmp_path / "out/cn/pipeline-pp1-fp32-rate10/requests.jsonl").read_text()
    endpoint = _experiment(tmp_path, "http://127.0.0.1:9", "{kind: serving, rate: 10, client: {nodes: 2}}")
    proc = _run(endpoint, tmp_path / "out2")
    assert proc.returncode == 2 and "scenario.client.nodes" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_stream_without_line_ends_fails_its_request_not_the_client() -> None:
    """A server that streams 2 MiB with no line end: the request fails naming the cap, memory stays bounded, and
    the client goes on to the next request."""
    import asyncio

    from aiohttp import web

    from distinfer.serving.client import MAX_EVENT_BYTES, Request, Target, run_load

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(2 * MAX_EVENT_BYTES // 65536 + 1):
            await response.write(b"x" * 65536)
        return response

    async def main() -> list:
        app = web.Application()
        app.router.add_post("/v1/completions", endless)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            url = f"http://127.0.0.1:{port}"
            return await run_load(Target(url, "m"), [Request(i, f"p{i}", "hi", 4) for i in range(2)],
                                  lambda r: None, concurrency=1)
        finally:
            await runner.cleanup()

    records = asyncio.run(main())
    assert len(records) == 2 and all(f"longer than {MAX_EVENT_BYTES} bytes" in (r.error or "") for r in records)
