"""distinfer's load generator beside two off-the-shelf ones, NVIDIA's AIPerf and guidellm, against one `distinfer
serve` through /v1/chat/completions: each tool's median TTFT and TPOT on the same load, and whether they agree.

Needs the clients' environments (`make clients-env`: .venv-aiperf and .venv-guidellm, each its own venv). First
each tool runs a short load with its own defaults against the server (the chat API, streamed, its default
prompts), which must complete without errors. Then the measured part: the same load from each tool, `--repeats`
times, the order of the three rotating between repeats: constant arrivals at `--rate` requests/s (Poisson draws
differ between tools), `--requests` requests of `--input-tokens` synthetic prompt tokens and `--output-tokens`
generated (ignore_eos), no warm-up. Printed per run and as medians over repeats: median TTFT and median TPOT
((E2E - TTFT) / (output tokens - 1) per request: AIPerf's inter_token_latency, guidellm's inter_token_latency_ms,
distinfer's tpot_s), and each tool's gap to distinfer's (goal: within 10 %). AIPerf counts output tokens by
re-tokenizing the streamed text unless told otherwise; it is given --use-server-token-count (the server's usage),
as the others count.

    python -m bench.clients [--rate 4] [--requests 32] [--input-tokens 64] [--output-tokens 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.experiments import experiment_file, run_local
from bench.vllm_side_by_side import start_distinfer, stop, wait_healthy
from distinfer.net import free_port

REPO = Path(__file__).resolve().parent.parent
AIPERF = REPO / ".venv-aiperf" / "bin" / "aiperf"
GUIDELLM = REPO / ".venv-guidellm" / "bin" / "guidellm"
TOOLS = ("distinfer", "aiperf", "guidellm")
TIMEOUT_S = 900


def tool_env() -> dict[str, str]:
    """The clients' environment: AIPerf's offline mode looks for tokenizers in the Hub's cache only, so it runs
    online, reading the model folder it is given (no download: a folder is not a Hub name)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HUB_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1")
    return env


def run_tool(args: list[str], work: Path, what: str) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=work, env=tool_env())
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def aiperf(work: Path, name: str, url: str, model: Path, load: argparse.Namespace | None) -> dict:
    """AIPerf's `profile` (chat, streamed): with `load` the measured load, else its defaults for 8 requests.
    Median TTFT and TPOT in ms, errors, and the output tokens it counted (median)."""
    out = work / name
    args = [str(AIPERF), "profile", "--model-names", "tiny-llama", "--url", url, "--endpoint-type", "chat",
            "--streaming", "--tokenizer", str(model), "--output-artifact-dir", str(out), "--ui-type", "none",
            "--no-server-metrics", "--no-gpu-telemetry"]
    if load is None:
        args += ["--request-count", "8"]
    else:
        args += ["--request-rate", str(load.rate), "--arrival-pattern", "constant", "--request-count",
                 str(load.requests), "--prompt-input-tokens-mean", str(load.input_tokens),
                 "--prompt-input-tokens-stddev", "0", "--prompt-output-tokens-mean", str(load.output_tokens),
                 "--prompt-output-tokens-stddev", "0", "--extra-inputs", "ignore_eos:true", "--random-seed", "0",
                 "--use-server-token-count"]
    run_tool(args, work, f"aiperf {name}")
    result = json.loads((out / "profile_export_aiperf.json").read_text())
    errors = (result.get("error_summary") or [])
    return {"ttft_ms": result["time_to_first_token"]["p50"], "tpot_ms": result["inter_token_latency"]["p50"],
            "requests": result["request_count"]["avg"], "errors": len(errors),
            "output_tokens": result["output_sequence_length"]["p50"]}


def guidellm(work: Path, name: str, url: str, model: Path, load: argparse.Namespace | None) -> dict:
    """guidellm's `run` (its openai_http backend: chat, streamed): with `load` the measured load at a constant
    rate, else the sweep of its documented default (it asks for a profile) over 4 requests a strategy, with its
    documented synthetic data (it has no default data). Median TTFT and TPOT (its inter-token latency) in ms of its last benchmark."""
    out = work / f"{name}.json"
    args = [str(GUIDELLM), "run", "--backend", f"kind=openai_http,target={url}",
            "--tokenizer", f"kind=hf_auto,model={model}", "--output", f"kind=json,path={out}",
            "--disable-console-interactive"]
    if load is None:
        args += ["--profile", "kind=sweep", "--data", "kind=synthetic_text,prompt_tokens=256,output_tokens=128",
                 "--constraint", "kind=max_requests,count=4"]
    else:
        args += ["--profile", f"kind=constant,rate={load.rate}", "--constraint",
                 f"kind=max_requests,count={load.requests}", "--data",
                 f"kind=synthetic_text,prompt_tokens={load.input_tokens},output_tokens={load.output_tokens}"]
    run_tool(args, work, f"guidellm {name}")
    metrics = json.loads(out.read_text())["benchmarks"][-1]["metrics"]
    totals = metrics["request_totals"]
    return {"ttft_ms": metrics["time_to_first_token_ms"]["successful"]["median"],
            "tpot_ms": metrics["inter_token_latency_ms"]["successful"]["median"],
            "requests": totals["successful"], "errors": totals["errored"],
            "output_tokens": metrics["output_token_count"]["successful"]["median"]}


def distinfer(work: Path, name: str, url: str, model: Path, load: argparse.Namespace) -> dict:
    """distinfer's load generator (an endpoint experiment, api: chat, synthetic text prompts of the asked
    length, constant arrivals): median TTFT and TPOT in ms."""
    config = experiment_file(
        work / f"{name}.yaml", name, model={"path": str(model)},
        scenario={"kind": "serving", "api": "chat", "rate": load.rate, "arrivals": "constant",
                  "requests": load.requests, "warmup_requests": 0, "ignore_eos": True, "input": "synthetic",
                  "synthetic": {"input_tokens": load.input_tokens, "output_tokens": load.output_tokens}},
        endpoint={"url": url, "model": "tiny-llama"})
    proc = run_local(config, "--force", "--outputs", str(work / "outputs"), timeout=TIMEOUT_S)
    summaries = [json.loads(p.read_text()) for p in (work / "outputs" / name).glob("*/summary.json")]
    if proc.returncode != 0 or not summaries:
        raise RuntimeError(f"distinfer {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = summaries[0]
    records = [json.loads(line) for line in (work / "outputs" / name).glob("*/requests.jsonl").__next__().open()]
    return {"ttft_ms": summary["ttft_s"]["p50"] * 1e3, "tpot_ms": summary["tpot_s"]["p50"] * 1e3,
            "requests": summary["completed"], "errors": summary["errors"],
            "output_tokens": statistics.median(r["output_tokens"] for r in records)}


def main() -> None:
    from distinfer.models.tiny import build_tiny_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=4.0, help="requests/s, constant arrivals")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--input-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    load = parser.parse_args()
    missing = [str(p) for p in (AIPERF, GUIDELLM) if not p.is_file()]
    if missing:
        sys.exit(f"the clients' environments are missing ({', '.join(missing)}): run `make clients-env` first")
    model = build_tiny_model("tiny-llama")
    measure = {"distinfer": distinfer, "aiperf": aiperf, "guidellm": guidellm}
    medians: dict[str, dict[str, list[float]]] = {t: {"ttft_ms": [], "tpot_ms": []} for t in TOOLS}
    with tempfile.TemporaryDirectory(prefix="distinfer-clients-") as folder:
        work = Path(folder)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc, log = start_distinfer(work, model, "pp1", port)
        try:
            wait_healthy(url, proc, log)
            for tool, run in (("aiperf", aiperf), ("guidellm", guidellm)):
                result = run(work, f"{tool}-defaults", url, model, None)
                if result["errors"] or not result["requests"]:
                    raise RuntimeError(f"{tool} with its defaults: {result}")
                print(f"{tool} with its defaults (chat API): {result['requests']:g} requests, no errors, TTFT p50 "
                      f"{result['ttft_ms']:.2f} ms", flush=True)
            for repeat in range(load.repeats):
                order = TOOLS[repeat % 3:] + TOOLS[:repeat % 3]
                for tool in order:
                    result = measure[tool](work, f"{tool}-{repeat}", url, model, load)
                    if result["errors"] or result["requests"] != load.requests:
                        raise RuntimeError(f"{tool} repeat {repeat}: {result}")
                    for metric in ("ttft_ms", "tpot_ms"):
                        medians[tool][metric].append(result[metric])
                    print(f"repeat {repeat} {tool:>9}: TTFT p50 {result['ttft_ms']:.2f} ms, TPOT p50 "
                          f"{result['tpot_ms']:.3f} ms, output tokens p50 {result['output_tokens']:g}", flush=True)
        finally:
            stop(proc)
    print(f"\ndistinfer's server (tiny Llama, one rank), /v1/chat/completions, {load.requests} requests at a constant "
          f"{load.rate:g}/s, {load.input_tokens} prompt + {load.output_tokens} output tokens; medians of "
          f"{load.repeats} repeats:")
    ours = {m: statistics.median(medians["distinfer"][m]) for m in ("ttft_ms", "tpot_ms")}
    for tool in TOOLS:
        line = []
        for metric, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT")):
            value = statistics.median(medians[tool][metric])
            gap = value / ours[metric] - 1
            verdict = "" if tool == "distinfer" else f" ({gap:+.1%} {'within' if abs(gap) <= 0.10 else 'NOT within'} 10 %)"
            line.append(f"median {label} {value:.3f} ms{verdict}")
        print(f"  {tool:>9}: " + ", ".join(line))


if __name__ == "__main__":
    main()
