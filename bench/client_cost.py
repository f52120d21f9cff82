"""What a load generator costs: distinfer's client beside `vllm bench serve`, AIPerf and guidellm against
distinfer's mock server (no model: the client is what is measured), side by side in one run.

The mock server runs on the last core, every client on the others (`taskset`), so the two never share one.
  cost     each client streams `--requests` and then 3 x `--requests` requests of `--tokens` tokens (one chunk
           each) at `--concurrency` in flight, completions API; its CPU time (user + system of its whole process
           tree) and wall time are read around each run; the difference between the two runs leaves start-up
           out: CPU microseconds per streamed chunk, and chunks/s sustained (the chunks the mock server counted
           over the wall time). distinfer's client is also run with `client.processes: 2` (its two workers share
           the client's cores).
  lag      distinfer's client alone, open loop at 200, 1,000 and 2,000 requests/s (constant arrivals, 2 s of
           requests of 4 tokens): the dispatch lag p99 (sent - intended) from its summary.
Goals, printed with the figures: distinfer's CPU per chunk no more than the cheapest peer's; dispatch lag p99 under
1 ms at 1,000 requests/s; two processes no more than 1.1 x the CPU per chunk of one.

Needs `make vllm-env` and `make clients-env` for the peers (a missing one is reported and left out).

    python -m bench.client_cost [--requests 1000] [--tokens 64] [--concurrency 32] [--rates 200,1000,2000]
                                [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.clients import AIPERF, GUIDELLM, tool_env
from bench.experiments import experiment_file
from bench.vllm_side_by_side import VLLM_PYTHON
from distinfer.net import free_port
from distinfer.serving.runner import wait_healthy
from distinfer.serving.server_metrics import scrape

REPO = Path(__file__).resolve().parent.parent
CORES = sorted(os.sched_getaffinity(0))
SERVER_CORES, CLIENT_CORES = CORES[-1:], (CORES[:-1] or CORES)
TIMEOUT_S = 900


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def chunks_sent(url: str) -> float:
    return (scrape(url) or {}).get("mock_tokens_total", 0.0)


def timed(command: list[str], url: str, work: Path, env: dict | None = None) -> tuple[float, float, float]:
    """Run `command` on the client cores to its end: (CPU s of its process tree, wall s, chunks streamed)."""
    cpu, wall, chunks = children_cpu_s(), time.monotonic(), chunks_sent(url)
    taskset = ["taskset", "-c", ",".join(map(str, CLIENT_CORES))]
    proc = subprocess.run(taskset + command, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=work,
                          env=env or os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return children_cpu_s() - cpu, time.monotonic() - wall, chunks_sent(url) - chunks


def distinfer_command(work: Path, url: str, requests: int, tokens: int, concurrency: int, processes: int = 1,
                      rate: float | None = None, name: str = "d") -> list[str]:
    scenario = {"kind": "serving", "requests": requests, "warmup_requests": 0, "input": "synthetic",
                "synthetic": {"input_tokens": 16, "output_tokens": tokens}, "client": {"processes": processes}}
    scenario.update({"rate": rate, "arrivals": "constant"} if rate else {"concurrency": concurrency})
    config = experiment_file(work / f"{name}.yaml", name, scenario=scenario, endpoint={"url": url, "model": "mock"})
    return [sys.executable, "-m", "distinfer", "run", str(config), "--local", "--force", "--outputs",
            str(work / "outputs")]


def peer_commands(work: Path, url: str, model: Path, requests: int, tokens: int, concurrency: int) -> dict:
    """The peers' command lines for one load (those whose environment exists)."""
    commands = {}
    if VLLM_PYTHON.is_file():
        commands["vllm bench serve"] = [
            str(VLLM_PYTHON), "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "openai",
            "--base-url", url, "--endpoint", "/v1/completions", "--model", "mock", "--tokenizer", str(model),
            "--dataset-name", "random", "--random-input-len", "16", "--random-output-len", str(tokens),
            "--num-prompts", str(requests), "--max-concurrency", str(concurrency), "--request-rate", "inf",
            "--ignore-eos", "--num-warmups", "0", "--disable-tqdm"]
    if AIPERF.is_file():
        commands["AIPerf"] = [
            str(AIPERF), "profile", "--model-names", "mock", "--url", url, "--endpoint-type", "completions",
            "--streaming", "--tokenizer", str(model), "--concurrency", str(concurrency), "--request-count",
            str(requests), "--prompt-input-tokens-mean", "16", "--prompt-input-tokens-stddev", "0",
            "--prompt-output-tokens-mean", str(tokens), "--prompt-output-tokens-stddev", "0", "--extra-inputs",
            "ignore_eos:true", "--output-artifact-dir", str(work / "aiperf"), "--ui-type", "none",
            "--no-server-metrics", "--no-gpu-telemetry", "--use-server-token-count"]
    if GUIDELLM.is_file():
        commands["guidellm"] = [
            str(GUIDELLM), "run", "--backend", f"kind=openai_http,target={url},model=mock",
            "--tokenizer", f"kind=hf_auto,model={model}", "--profile", f"kind=concurrent,streams={concurrency}",
            "--constraint", f"kind=max_requests,count={requests}", "--data",
            f"kind=synthetic_text,prompt_tokens=16,output_tokens={tokens}",
            "--output", f"kind=json,path={work / 'guidellm.json'}", "--disable-console-interactive"]
    return commands


def cost(make: callable, url: str, work: Path, requests: int, env: dict | None = None) -> dict:  # noqa: ANN001
    """CPU us per chunk and chunks/s of a client, from a run of `requests` and one of 3 x `requests`."""
    small = timed(make(requests), url, work, env)
    large = timed(make(3 * requests), url, work, env)
    chunks = large[2] - small[2]
    if chunks <= 0:
        raise RuntimeError(f"no more chunks in the larger run ({small}, {large})")
    return {"cpu_us_per_chunk": (large[0] - small[0]) / chunks * 1e6, "chunks_per_s": chunks / (large[1] - small[1]),
            "chunks": chunks}


def main() -> None:
    from distinfer.models.tiny import build_tiny_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rates", default="200,1000,2000")
    parser.add_argument("--repeats", type=int, default=3, help="cost runs of each client, rotating (medians)")
    args = parser.parse_args()
    model = build_tiny_model("tiny-llama")  # the peers' tokenizer
    results: dict[str, dict] = {}
    lags: dict[float, float] = {}
    with tempfile.TemporaryDirectory(prefix="distinfer-client-cost-") as folder:
        work = Path(folder)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(["taskset", "-c", ",".join(map(str, SERVER_CORES)), sys.executable, "-m",
                                   "distinfer.serving.mock", "--port", str(port)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            wait_healthy(url, server.poll, 60)
            print(f"mock server on core(s) {SERVER_CORES}, clients on {CLIENT_CORES}", flush=True)
            makers = {
                "distinfer": lambda n: distinfer_command(work, url, n, args.tokens, args.concurrency, 1),
                "distinfer, 2 processes": lambda n: distinfer_command(work, url, n, args.tokens, args.concurrency, 2),
                **{name: (lambda n, t=name: peer_commands(work, url, model, n, args.tokens, args.concurrency)[t])
                   for name in peer_commands(work, url, model, 1, args.tokens, args.concurrency)}}
            runs: dict[str, list[dict]] = {name: [] for name in makers}
            for repeat in range(args.repeats):
                order = list(makers)[repeat % len(makers):] + list(makers)[:repeat % len(makers)]
                for name in order:
                    env = tool_env() if name in ("AIPerf", "guidellm") else None
                    runs[name].append(cost(makers[name], url, work, args.requests, env))
                    print(f"repeat {repeat} {name}: {runs[name][-1]['cpu_us_per_chunk']:.1f} us CPU per chunk, "
                          f"{runs[name][-1]['chunks_per_s']:,.0f} chunks/s", flush=True)
            results = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
            for rate in (float(r) for r in args.rates.split(",")):
                name = f"lag{rate:g}"
                timed(distinfer_command(work, url, int(2 * rate), 4, 1, rate=rate, name=name), url, work)
                summary = json.loads(next((work / "outputs" / name).glob("*/summary.json")).read_text())
                lags[rate] = summary["send_lag_s"]["p99"]
                print(f"open loop at {rate:g} requests/s: dispatch lag p99 {lags[rate] * 1e3:.3f} ms, "
                      f"achieved {summary['achieved_rate']:.0f}/s, client CPU {summary['client_cpu_share']:.0%}, "
                      f"valid: {summary['valid']}", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=10)
    print(f"\nclient cost against the mock server ({args.tokens} one-token chunks a request, {args.concurrency} "
          f"in flight; mock on core(s) {SERVER_CORES}, clients on {CLIENT_CORES}; medians of {args.repeats}):")
    for name, figures in results.items():
        print(f"  {name:>24}: {figures['cpu_us_per_chunk']:7.1f} us CPU per chunk, {figures['chunks_per_s']:9,.0f} "
              "chunks/s")
    peers = {k: v["cpu_us_per_chunk"] for k, v in results.items() if not k.startswith("distinfer")}
    ours = results["distinfer"]["cpu_us_per_chunk"]
    if peers:
        cheapest = min(peers, key=peers.get)
        print(f"  goal: distinfer's CPU per chunk <= the cheapest peer's ({cheapest}, {peers[cheapest]:.1f} us): "
              f"{ours:.1f} us, {'met' if ours <= peers[cheapest] else 'NOT met'}")
    two = results["distinfer, 2 processes"]["cpu_us_per_chunk"] / ours
    print(f"  goal: two processes <= 1.1 x the CPU per chunk of one: {two:.2f} x, {'met' if two <= 1.1 else 'NOT met'}")
    if 1000.0 in lags:
        print(f"  goal: dispatch lag p99 < 1 ms at 1,000 requests/s: {lags[1000.0] * 1e3:.3f} ms, "
              f"{'met' if lags[1000.0] < 1e-3 else 'NOT met'}")


if __name__ == "__main__":
    main()
