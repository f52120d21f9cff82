"""Serving overhead: distinfer's server at saturation against the same layout offline at its best batch size.

For each layout (one stage; two stages with two groups of requests in flight), in one run and alternating:
  offline   `distinfer run --local` of the same prompts in batches of 4, 8 and 16 (its best: the highest output
            tokens/s of the three)
  served    a serving run of the same layout at rate inf: `--requests` requests of `--new-tokens` tokens each
            (ignore_eos), scenario.max_batch = 16, through HTTP, the load generator and continuous batching
  engine    (one stage) the server's engine in this process without HTTP: the same requests submitted at once;
            what continuous batching costs by itself, apart from the HTTP server and the load generator that
            share the machine's cores with it
Both sides run the layers through `transformers` (`cpu_kernels: stock`, which the server uses); the offline
pipeline with distinfer's CPU decode path (`fast`, the default for offline runs) is printed beside them.
Prints median output tokens/s over `--repeats` and the ratio served / offline best (target >= 0.90).

    python -m bench.serving_overhead [--model bench|tiny] [--layouts pp1,pp2] [--repeats 3] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BATCHES = (4, 8, 16)
LAYOUTS = {"pp1": {"engine": "pipeline", "pp": 1}, "pp2": {"engine": "pipeline", "pp": 2, "microbatches": 2}}


def run(work: Path, name: str, experiment: dict) -> list[dict]:
    """`distinfer run --local --force` of one experiment; the summary.json of each of its runs."""
    config = work / f"{name}.yaml"
    config.write_text(json.dumps({"name": name, "reference": "none", **experiment}))
    proc = subprocess.run([sys.executable, "-m", "distinfer", "run", str(config), "--local", "--force",
                           "--outputs", str(work / "outputs")], capture_output=True, text=True, timeout=1800)
    summaries = [json.loads(p.read_text()) for p in sorted((work / "outputs" / name).glob("*/summary.json"))]
    if proc.returncode != 0 or not summaries:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return summaries


def offline(work: Path, model: Path, layout: str, kernels: str, new_tokens: int) -> float:
    """The layout's best offline output tokens/s over the batch sizes."""
    summaries = run(work, f"offline-{layout}-{kernels}", {
        "model": {"path": str(model)}, "prompts": str(REPO / "prompts/correctness.jsonl"),
        "generation": {"max_new_tokens": new_tokens}, "parallel": {**LAYOUTS[layout], "cpu_kernels": kernels},
        "batch_size": list(BATCHES), "benchmark": {"warmup": 1, "repeats": 1}})
    return max(float(s["output_tokens_per_s"]) for s in summaries)


def served(work: Path, model: Path, layout: str, requests: int, new_tokens: int) -> float:
    """Output tokens/s of distinfer's server for the layout, everything sent at once."""
    summaries = run(work, f"served-{layout}", {
        "model": {"path": str(model)}, "prompts": str(REPO / "prompts/correctness.jsonl"),
        "generation": {"max_new_tokens": new_tokens}, "parallel": LAYOUTS[layout],
        "scenario": {"kind": "serving", "rate": "inf", "requests": requests, "warmup_requests": 2,
                     "ignore_eos": True, "max_batch": max(BATCHES)}})
    return float(summaries[0]["output_tokens_per_s"])


def engine_alone(model: Path, requests: int, new_tokens: int) -> float:
    """Output tokens/s of the one-stage serving engine in this process: every request submitted at once."""
    import threading
    import time

    import torch

    from distinfer.layout import split_layers
    from distinfer.models.loading import load_stage_model, load_tokenizer
    from distinfer.models.profiles import model_layer_count
    from distinfer.prompts import load_prompts
    from distinfer.serving.engine import ServingEngine
    from distinfer.serving.stages import StageState

    stage_model, family = load_stage_model(model, split_layers(model_layer_count(model), 1)[0], "float32",
                                           torch.device("cpu"))
    tokenizer = load_tokenizer(model)
    prompts = [tokenizer(p.prompt)["input_ids"] for p in load_prompts(REPO / "prompts/correctness.jsonl")]
    engine = ServingEngine(StageState(stage_model, family, torch.device("cpu"), True, True, 1), None,
                           (), max_batch=max(BATCHES))
    worker = threading.Thread(target=engine.run_forever, daemon=True)
    worker.start()
    ended = threading.Semaphore(0)

    def emit(token: int | None, reason: str | None) -> None:
        if reason is not None:
            ended.release()

    try:
        for count in (2, requests):  # a warm-up, then the measured requests
            start = time.perf_counter()
            for i in range(count):
                engine.submit(prompts[i % len(prompts)], new_tokens, emit, ignore_eos=True)
            for _ in range(count):
                ended.acquire()
            seconds = time.perf_counter() - start
    finally:
        engine.stop()
        worker.join(timeout=30)
    return requests * new_tokens / seconds


def main() -> None:
    from bench.model import build_model
    from distinfer.models.tiny import build_tiny_model, cache_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("bench", "tiny"), default="bench")
    parser.add_argument("--layouts", default="pp1,pp2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=48)
    args = parser.parse_args()
    model = build_model(cache_dir()) if args.model == "bench" else build_tiny_model("tiny-llama")
    layouts = args.layouts.split(",")
    figures: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="distinfer-serving-overhead-") as folder:
        work = Path(folder)
        for repeat in range(args.repeats):
            for layout in layouts if repeat % 2 == 0 else layouts[::-1]:
                sides = ("stock", "served", "fast") + (("engine",) if layout == "pp1" else ())
                for side in sides if repeat % 2 == 0 else sides[::-1]:
                    if side == "engine":
                        value = engine_alone(model, args.requests, args.new_tokens)
                    elif side == "served":
                        value = served(work, model, layout, args.requests, args.new_tokens)
                    else:
                        value = offline(work, model, layout, side, args.new_tokens)
                    figures.setdefault((layout, side), []).append(value)
                    print(f"repeat {repeat} {layout} {side}: {value:.1f} tokens/s", flush=True)
    print(f"\nmodel {model.name}, {args.new_tokens} new tokens, medians of {args.repeats} (output tokens/s):")
    for layout in layouts:
        stock, serve, fast = (statistics.median(figures[(layout, side)]) for side in ("stock", "served", "fast"))
        ratio = serve / stock
        print(f"  {layout}: offline best (transformers' layers) {stock:.1f}, served {serve:.1f}: ratio {ratio:.2f} "
              f"(target >= 0.90: {'met' if ratio >= 0.9 else 'NOT met'}); offline with distinfer's CPU decode path "
              f"{fast:.1f} (served / that {serve / fast:.2f})")
        if (layout, "engine") in figures:
            alone = statistics.median(figures[(layout, "engine")])
            print(f"  {layout}: the serving engine alone (no HTTP, no load generator) {alone:.1f}: "
                  f"{alone / stock:.2f} of offline best")


if __name__ == "__main__":
    main()
