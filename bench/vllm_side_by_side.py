"""distinfer's server and vLLM's (`vllm serve`, the engine users deploy) on the same tiny model, same layout, same load;
and vLLM's own client (`vllm bench serve`) as an independent meter of distinfer's server.

Needs vLLM's environment (`make vllm-env`: .venv-vllm, vLLM's CPU build in its own venv, as it pins another
transformers). For each layout (`pp1`: one stage; `pp2`: two pipeline stages, distinfer with two groups of requests
in flight, vLLM with `--pipeline-parallel-size 2`), in one run, the servers one after the other:
  speed   distinfer's load generator (an endpoint experiment, rate inf, `--requests` x `--new-tokens` tokens,
          ignore_eos, prompts of `--input-tokens` random token ids) against each server, `--repeats` times: median
          output tokens/s at saturation and TPOT p50, and the ratio distinfer / vLLM (goal: at least 1 here)
  meter   at `--rate` requests/s (Poisson, seeded), the same text prompts in the same order (a prompt file that
          both read: vLLM's custom dataset) from `vllm bench serve` and from distinfer's load generator against
          distinfer's one-stage server, `--repeats` times each, alternating: median TTFT and TPOT of each, and
          their difference (goal: within 10 %)
Every server is stopped by its PID (its process group), and vLLM's files in /dev/shm and /tmp are removed.

    python -m bench.vllm_side_by_side [--layouts pp1,pp2] [--requests 32] [--new-tokens 32] [--rate 4] [--repeats 3]
                                      [--parts speed,meter]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.experiments import PROMPTS, experiment_file, run_local
from distinfer.net import free_port

REPO = Path(__file__).resolve().parent.parent
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
SERVER_TIMEOUT_S = 600
MAX_BATCH = 16


def wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    """Once /health answers (the runner's wait); the server's log in the error if it ends first."""
    from distinfer.serving.runner import EndpointError
    from distinfer.serving.runner import wait_healthy as wait

    try:
        wait(url, proc.poll, SERVER_TIMEOUT_S)
    except EndpointError as exc:
        raise RuntimeError(f"{exc}; its log:\n{log.read_text()[-3000:]}") from None


def stop(proc: subprocess.Popen) -> None:
    """The server's process group stopped (SIGTERM, SIGKILL after 30 s), then vLLM's shared-memory files removed."""
    from distinfer.serving.vllm import leftovers, remove, stop_group

    stop_group(proc)
    remove(leftovers())


def start_distinfer(work: Path, model: Path, layout: str, port: int) -> tuple[subprocess.Popen, Path]:
    parallel = {"pp1": {"pp": 1}, "pp2": {"pp": 2, "microbatches": 2}}[layout]
    config = experiment_file(work / f"serve-{layout}.yaml", f"serve-{layout}", model={"path": str(model)},
                             reference="none", parallel={"engine": "pipeline", **parallel},
                             batch_size=parallel.get("microbatches", 1))  # the server's groups
    groups = parallel.get("microbatches", 1)
    run_id = f"pipeline-pp{parallel['pp']}-b{groups}-mb{groups}-fp32"
    log = work / f"distinfer-{layout}.log"
    return subprocess.Popen([sys.executable, "-m", "distinfer", "serve", str(config), "--run", run_id, "--port",
                             str(port), "--max-batch", str(MAX_BATCH)], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True), log


def start_vllm(work: Path, model: Path, layout: str, port: int,
               max_model_len: int = 512) -> tuple[subprocess.Popen, Path]:
    pp = {"pp1": 1, "pp2": 2}[layout]
    cores = len(os.sched_getaffinity(0))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1",
           # one thread group per rank: pp 2 on two cores binds one core each
           "VLLM_CPU_OMP_THREADS_BIND": "|".join(f"{r * cores // pp}-{(r + 1) * cores // pp - 1}" for r in range(pp))}
    # through vLLM's command line, which picks the CPU platform where no accelerator is found
    args = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.cli.main", "serve", str(model), "--dtype", "float32",
            "--max-model-len", str(max_model_len), "--port", str(port), "--max-num-seqs", str(MAX_BATCH)]
    if pp > 1:  # vLLM's CPU pipeline ran only compiled (with --enforce-eager its second stage failed)
        args += ["--pipeline-parallel-size", str(pp), "--distributed-executor-backend", "mp"]
    else:
        args += ["--enforce-eager"]
    log = work / f"vllm-{layout}.log"
    return subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True), log


def meter_prompts(work: Path, count: int) -> Path:
    """The meter's prompt file: `count` text prompts (the correctness prompts, cycled), read by both clients in
    this order, so that both send the same texts."""
    texts = [json.loads(line)["prompt"] for line in (REPO / "prompts" / "correctness.jsonl").open()]
    path = work / "meter-prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"m{i}", "prompt": texts[i % len(texts)]}) + "\n" for i in range(count)))
    return path


def load(work: Path, name: str, url: str, model_name: str, model: Path, rate: float | str, requests: int,
         new_tokens: int, input_tokens: int, prompts: Path | None = None) -> dict:
    """distinfer's load generator against `url` (an endpoint experiment): synthetic token-id prompts of
    `input_tokens`, or the text prompts of `prompts` in order; the run's summary.json."""
    source = {"input": "prompts"} if prompts else {
        "input": "synthetic", "synthetic": {"input_tokens": {"mean": input_tokens}, "output_tokens": {"mean": new_tokens}}}
    config = experiment_file(
        work / f"{name}.yaml", name, model={"path": str(model)}, prompts=str(prompts or PROMPTS),
        generation={"max_new_tokens": new_tokens},
        scenario={"kind": "serving", "rate": rate, "seed": 0, "requests": requests,
                  "warmup_requests": 0 if prompts else 2, "ignore_eos": True, **source},
        endpoint={"url": url, "model": model_name})
    proc = run_local(config, "--force", "--outputs", str(work / "outputs"), timeout=1800)
    summaries = [json.loads(p.read_text()) for p in (work / "outputs" / name).glob("*/summary.json")]
    if proc.returncode != 0 or not summaries:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return summaries[0]


def vllm_meter(work: Path, url: str, model_name: str, model: Path, rate: float, requests: int, new_tokens: int,
               prompts: Path) -> dict:
    """`vllm bench serve` (vLLM's own client) against `url` with the prompts of `prompts` in order (its custom
    dataset, unshuffled, no chat template): its JSON result."""
    result = work / "vllm-bench.json"
    result.unlink(missing_ok=True)  # an earlier repeat's
    args = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "openai",
            "--base-url", url, "--endpoint", "/v1/completions", "--model", model_name, "--tokenizer", str(model),
            "--dataset-name", "custom", "--dataset-path", str(prompts), "--disable-shuffle", "--skip-chat-template",
            "--custom-output-len", str(new_tokens), "--num-prompts", str(requests), "--request-rate", str(rate),
            "--seed", "0", "--ignore-eos", "--save-result", "--result-dir", str(work), "--result-filename", result.name]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=1800, cwd=work)
    if proc.returncode != 0 or not result.is_file():
        raise RuntimeError(f"vllm bench serve failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def measure_meter(work: Path, url: str, name: str, model: Path, args: argparse.Namespace) -> dict:
    """The same seeded load from both clients, `--repeats` times each, alternating which goes first: per metric,
    the median over repeats of each client's median (ms)."""
    ours: dict[str, list[float]] = {"ttft": [], "tpot": []}
    theirs: dict[str, list[float]] = {"ttft": [], "tpot": []}
    prompts = meter_prompts(work, args.requests)
    for repeat in range(args.repeats):
        for client in ("distinfer", "vllm") if repeat % 2 == 0 else ("vllm", "distinfer"):
            if client == "distinfer":
                summary = load(work, f"meter-{repeat}", url, name, model, args.rate, args.requests, args.new_tokens,
                               args.input_tokens, prompts)
                ours["ttft"].append(summary["ttft_s"]["p50"] * 1e3)
                ours["tpot"].append(summary["tpot_s"]["p50"] * 1e3)
            else:
                result = vllm_meter(work, url, name, model, args.rate, args.requests, args.new_tokens, prompts)
                theirs["ttft"].append(result["median_ttft_ms"])
                theirs["tpot"].append(result["median_tpot_ms"])
        print(f"meter {repeat}: TTFT {ours['ttft'][-1]:.2f} / {theirs['ttft'][-1]:.2f} ms, TPOT {ours['tpot'][-1]:.2f} / "
              f"{theirs['tpot'][-1]:.2f} ms (distinfer's / vLLM's client)", flush=True)
    return {m: (statistics.median(ours[m]), statistics.median(theirs[m])) for m in ("ttft", "tpot")}


def served_model_name(url: str) -> str:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as response:
        return json.loads(response.read())["data"][0]["id"]


def main() -> None:
    from distinfer.models.tiny import build_tiny_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layouts", default="pp1,pp2")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--input-tokens", type=int, default=64)
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3, help="loads against each server (medians printed)")
    parser.add_argument("--parts", default="speed,meter", help="speed, meter, or both")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not VLLM_PYTHON.is_file():
        sys.exit(f"vLLM's environment is missing ({VLLM_PYTHON}): run `make vllm-env` first")
    model = build_tiny_model("tiny-llama")
    speed: dict[tuple[str, str], tuple[float, float]] = {}  # (layout, engine) -> (tokens/s, TPOT p50)
    with tempfile.TemporaryDirectory(prefix="distinfer-vllm-") as folder:
        work = Path(folder)
        for layout in args.layouts.split(","):
            for engine, start in (("distinfer", start_distinfer), ("vllm", start_vllm)):
                if "speed" not in parts and (engine, layout) != ("distinfer", "pp1"):
                    continue
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                started = time.monotonic()
                proc, log = start(work, model, layout, port)
                try:
                    wait_healthy(url, proc, log)
                    print(f"{engine} {layout}: healthy after {time.monotonic() - started:.0f} s", flush=True)
                    name = served_model_name(url)
                    runs = []
                    for repeat in range(args.repeats if "speed" in parts else 0):
                        summary = load(work, f"{engine}-{layout}-{repeat}", url, name, model, "inf", args.requests,
                                       args.new_tokens, args.input_tokens)
                        runs.append((summary["output_tokens_per_s"], summary["tpot_s"]["p50"]))
                        print(f"{engine} {layout}: {runs[-1][0]:.1f} output tokens/s, TPOT p50 "
                              f"{runs[-1][1] * 1e3:.2f} ms", flush=True)
                    if runs:
                        speed[(layout, engine)] = (statistics.median(r[0] for r in runs),
                                                   statistics.median(r[1] for r in runs))
                    if engine == "distinfer" and layout == "pp1" and "meter" in parts:
                        meter = measure_meter(work, url, name, model, args)
                finally:
                    stop(proc)
    if speed:
        print(f"\nspeed at saturation (tiny Llama, fp32, {args.requests} requests x {args.new_tokens} tokens, "
              f"{args.input_tokens}-token prompts, rate inf; medians of {args.repeats}):")
    for layout in args.layouts.split(",") if speed else []:
        (ours, our_tpot), (theirs, their_tpot) = speed[(layout, "distinfer")], speed[(layout, "vllm")]
        ratio = ours / theirs
        print(f"  {layout}: distinfer {ours:.1f} tok/s, TPOT p50 {our_tpot * 1e3:.2f} ms; vLLM {theirs:.1f} tok/s, "
              f"TPOT p50 {their_tpot * 1e3:.2f} ms; distinfer / vLLM tokens/s {ratio:.2f} "
              f"(goal >= 1: {'met' if ratio >= 1 else 'NOT met'})")
    if "pp1" in args.layouts.split(",") and "meter" in parts:
        print(f"\nindependent meter (distinfer's one-stage server, {args.rate:g} requests/s, medians of {args.repeats}):")
        for metric, (ours_ms, theirs_ms) in meter.items():
            gap = ours_ms / theirs_ms - 1
            print(f"  median {metric.upper()}: distinfer's load generator {ours_ms:.2f} ms, vllm bench serve "
                  f"{theirs_ms:.2f} ms ({gap:+.1%}; goal within 10 %: {'met' if abs(gap) <= 0.10 else 'NOT met'})")


if __name__ == "__main__":
    main()
