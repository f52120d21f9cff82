"""`make bench`: the engines side by side on one machine, interleaved, on a synthetic ~160 M-parameter Llama.

Measures, in one run and round-robin (repeat r runs every engine before repeat r+1 starts; odd repeats in
reverse order):
  hf-generate       `transformers` generate in this process, all cores (what a user would otherwise write)
  reference         distinfer's reference engine (generate inside a distinfer run)
  pp1-stock         distinfer pipeline, one stage, PyTorch's stock fp32 linear kernels (`cpu_kernels: stock`)
  pp1               distinfer pipeline, one stage (distinfer's CPU linear kernels, the default)
  pp2-mb<k>         distinfer pipeline, two stages (k micro-batches; k > 1 at batch 8 only)
  ds-tp2            DeepSpeed AutoTP over two ranks
  tp2               distinfer pipeline, one stage split over two ranks (torch.distributed.tensor.parallel);
                    not in the default set: `--engines tp2,ds-tp2` puts the two tensor-parallel engines side by side
  copy bandwidth    torch memory copy (read + write bytes per second): the decode speed limit
  stock row read    weight bytes/s of PyTorch's stock one-row product (HF generate's batch-1 kernel), each repeat
then HF generate, one stage and two stages batch by batch in the same two processes (bench/paired.py, which
also bounds one stage / HF generate at batch 1 by the time of the linear products alone), and prints
median tokens/s, the issue's ratios and the per-rank compute/communication/wait split, and writes
bench/results/bench-<time>.json. Token counts are those generated (through EOS, the same on every engine
since they are token-exact); distinfer figures are its own measured-batch throughput (warm-up and model load
excluded), HF generate is timed the same way (after one warm-up batch). The weight-read ratio
takes pp1's batch-1 decode step (mean time per output token after the first) as the time to read every
weight once (of the input embedding table, one row), against the copy bandwidth measured at the start of
the same repeat; bench/paired.py measures it again round by round, the bandwidth at the start of each round.

    python -m bench.bench [--repeats 5] [--new-tokens 32] [--engines pp1,hf-generate] [--rounds 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.experiments import experiment_file, run_local

REPO = Path(__file__).resolve().parent.parent
BATCHES = {1: 4, 8: 8}  # batch size -> prompts (batch 1: four one-prompt batches; batch 8: one full batch)
ENGINES = {  # name -> parallel settings (batch 8 gets more micro-batches where named)
    "reference": {"engine": "reference"},
    "pp1-stock": {"engine": "pipeline", "pp": 1, "cpu_kernels": "stock"},
    "pp1": {"engine": "pipeline", "pp": 1},
    "pp2-mb1": {"engine": "pipeline", "pp": 2, "microbatches": 1},
    "pp2-mb2": {"engine": "pipeline", "pp": 2, "microbatches": 2},
    "pp2-mb4": {"engine": "pipeline", "pp": 2, "microbatches": 4},
    "ds-tp2": {"engine": "deepspeed", "tp": 2},
    "tp2": {"engine": "pipeline", "pp": 1, "tp": 2},
}


def weight_bytes(model_dir: Path) -> tuple[int, int]:
    """Bytes of the bench model's fp32 weights, and of those a batch-1 decode step reads (bench/bandwidth.py's
    `decode_read_bytes`: all but the input embedding table, of which a step reads one row)."""
    from bench.bandwidth import decode_read_bytes
    from distinfer.models.loading import load_full_model

    model = load_full_model(model_dir, "float32", torch.device("cpu"))
    return sum(p.numel() * p.element_size() for p in model.parameters()), decode_read_bytes(model)


def prompts_file(work: Path, count: int) -> Path:
    lines = (REPO / "prompts" / "correctness.jsonl").read_text().splitlines()[:count]
    path = work / f"prompts-{count}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_distinfer(work: Path, model: Path, name: str, batch: int, new_tokens: int) -> dict:
    """One `distinfer run --local --force`; returns its summary.json."""
    parallel = dict(ENGINES[name])
    config = experiment_file(
        work / f"{name}-b{batch}.yaml", f"bench-{name}-b{batch}", model={"path": str(model)}, reference="none",
        prompts=str(prompts_file(work, BATCHES[batch])), generation={"max_new_tokens": new_tokens},
        parallel=parallel, batch_size=batch, benchmark={"warmup": 1, "repeats": 1})
    proc = run_local(config, "--force", "--outputs", str(work / "outputs"), timeout=1200)
    run_dirs = list((work / "outputs" / f"bench-{name}-b{batch}").glob("*/summary.json"))
    if proc.returncode != 0 or not run_dirs:
        raise RuntimeError(f"{name} batch {batch} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(run_dirs[0].read_text())


def run_hf_generate(model_dir: Path, work: Path, batch: int, new_tokens: int) -> dict:
    """HF generate in this process (all cores), the same prompts and batches, one warm-up batch first."""
    from distinfer.models.loading import load_full_model, load_tokenizer
    from distinfer.prompts import load_prompts
    from distinfer.runtime.cpu.threads import available_cores
    from distinfer.runtime.pipeline import eos_prefix
    from distinfer.runtime.reference import hf_generate
    from distinfer.runtime.worker import make_batches, stop_rule

    torch.set_num_threads(len(available_cores()))
    model = load_full_model(model_dir, "float32", torch.device("cpu"))
    tokenizer = load_tokenizer(model_dir)
    stop = stop_rule(model_dir, tokenizer, new_tokens)
    batches = make_batches(load_prompts(prompts_file(work, BATCHES[batch])), tokenizer, batch)

    cpu = torch.device("cpu")
    hf_generate(model, batches[0], stop, cpu)
    tokens, wall = 0, 0.0
    for b in batches:
        start = time.perf_counter()
        out = hf_generate(model, b, stop, cpu)
        wall += time.perf_counter() - start
        tokens += sum(len(eos_prefix(row, stop.eos_token_ids)) for row in out.tolist())
    return {"output_tokens": tokens, "output_tokens_per_s": tokens / wall}


ONE_PROCESS = ("reference", "pp1")
TWO_STAGES = ("pp2-mb1", "pp2-mb2", "pp2-mb4")


def run_order(engines: list[str], repeat: int) -> list[str]:
    """The engines in repeat `repeat`'s order: as given in even repeats, reversed in odd ones, so that of two
    neighbours each runs first in half the repeats (with one fixed order two stages always ran right after one
    stage: 0.94 of it per repeat, where interleaved runs in rotated order gave 0.966)."""
    return list(engines) if repeat % 2 == 0 else list(reversed(engines))


def repeat_ratios(samples: dict[tuple[str, int], list[float]], decode_step_s: dict[tuple[str, int], list[float]],
                  bandwidth: list[float], read_bytes: int) -> dict[str, list[float]]:
    """The issue's ratios, each taken within one repeat (the engines of a repeat run within a minute or two of
    each other, while this shared machine's speed drifts by up to 2x from minute to minute): one per repeat."""
    repeats = len(bandwidth)

    def at(name: str, batch: int, r: int) -> float | None:
        values = samples.get((name, batch), [])
        return values[r] if r < len(values) else None

    per: dict[str, list[float]] = {}
    for r in range(repeats):
        for batch in BATCHES:
            pp1, hf = at("pp1", batch, r), at("hf-generate", batch, r)
            if pp1 and hf:
                per.setdefault(f"pp1_over_hf_generate_b{batch}", []).append(pp1 / hf)
            one = [v for n in ONE_PROCESS if (v := at(n, batch, r))]
            two = [v for n in TWO_STAGES if (v := at(n, batch, r))]
            if one and two:
                per.setdefault(f"pp2_over_best_one_process_b{batch}", []).append(max(two) / max(one))
        steps = decode_step_s.get(("pp1", 1), [])
        if r < len(steps):  # a batch-1 decode step reads every weight once (of the embedding table, a row)
            per.setdefault("decode_weight_read_over_copy_bandwidth_b1", []).append(
                read_bytes / steps[r] / bandwidth[r])
    return per


def paired_ratios(per_repeat: dict[str, list[float]]) -> dict[str, float]:
    """The median over the repeats of each ratio taken within a repeat (`repeat_ratios`)."""
    return {key: statistics.median(values) for key, values in per_repeat.items()}


def main() -> None:
    from distinfer.models.tiny import cache_dir  # $DISTINFER_CACHE, else ~/.cache/distinfer
    from distinfer.runtime.cpu.threads import available_cores

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--engines", default="hf-generate," + ",".join(e for e in ENGINES if e != "tp2"))
    parser.add_argument("--rounds", type=int, default=16, help="rounds of bench/paired.py (0: skip it)")
    parser.add_argument("--cache", type=Path, default=cache_dir())
    args = parser.parse_args()
    from bench.bandwidth import StockRowRead, copy_bandwidth
    from bench.model import MODEL_CONFIG, build_model
    from bench.paired import describe as describe_paired
    from bench.paired import measure as measure_paired

    engines = args.engines.split(",")
    model = build_model(args.cache)
    total_bytes, read_bytes = weight_bytes(model)  # all weights; those a batch-1 decode step reads
    samples: dict[tuple[str, int], list[float]] = {}
    decode_step_s: dict[tuple[str, int], list[float]] = {}  # distinfer runs: mean time per output token after the first
    splits: dict[tuple[str, int], list[dict]] = {}
    bandwidth: list[float] = []
    stock_read: dict[str, list[float]] = {"all cores": [], "one core": []}  # bytes/s of HF generate's batch-1 kernel
    with tempfile.TemporaryDirectory(prefix="distinfer-bench-") as tmp:
        work = Path(tmp)
        for repeat in range(args.repeats):
            bandwidth.append(copy_bandwidth())
            probe = StockRowRead()
            for label, threads in (("one core", 1), ("all cores", len(available_cores()))):  # all: as HF runs
                torch.set_num_threads(threads)
                stock_read[label].append(probe.measure())
            del probe
            print(f"repeat {repeat + 1}/{args.repeats} copy {bandwidth[-1] / 1e9:.1f} GB/s, stock one-row product "
                  + ", ".join(f"{v[-1] / 1e9:.1f} GB/s on {k}" for k, v in stock_read.items()), flush=True)
            for batch in BATCHES:
                for name in run_order(engines, repeat):
                    if batch == 1 and name in ("pp2-mb2", "pp2-mb4"):
                        continue
                    if name == "hf-generate":
                        result = run_hf_generate(model, work, batch, args.new_tokens)
                    else:
                        result = run_distinfer(work, model, name, batch, args.new_tokens)
                        decode_step_s.setdefault((name, batch), []).append(result["tpot_s"]["mean"])
                        splits[(name, batch)] = [{k: r.get(k) for k in ("rank", "compute_s", "comm_s", "wait_s")}
                                                 for r in result.get("ranks", [])]
                    samples.setdefault((name, batch), []).append(result["output_tokens_per_s"])
                    print(f"repeat {repeat + 1}/{args.repeats} batch {batch} {name:12s} "
                          f"{result['output_tokens_per_s']:8.2f} tok/s", flush=True)
    paired_results = measure_paired(model, list(BATCHES), args.rounds, args.new_tokens, [2]) if args.rounds else {}
    median = {key: statistics.median(values) for key, values in samples.items()}
    copy_bw = statistics.median(bandwidth)
    print(f"\nmachine: {os.cpu_count()} cores; model: {total_bytes / 4 / 1e6:.0f} M parameters, fp32 "
          f"({total_bytes / 2**20:.0f} MiB); {args.new_tokens} new tokens; median of {args.repeats}")
    print(f"memory copy bandwidth: {copy_bw / 1e9:.2f} GB/s (read + write)")
    print("PyTorch's stock one-row product (HF generate's batch-1 kernel) read at " + ", ".join(
          f"{statistics.median(v) / 1e9:.1f} GB/s on {k} (repeats {min(v) / 1e9:.1f}-{max(v) / 1e9:.1f})"
          for k, v in stock_read.items()) + ": a repeat far below the others slowed HF generate there\n")
    print(f"{'engine':14s} {'batch 1 tok/s':>14s} {'batch 8 tok/s':>14s}")
    for name in engines:
        cells = [f"{median[(name, b)]:14.2f}" if (name, b) in median else f"{'-':>14s}" for b in BATCHES]
        print(f"{name:14s} {' '.join(cells)}")
    per_repeat = repeat_ratios(samples, decode_step_s, bandwidth, read_bytes)
    ratios = paired_ratios(per_repeat)
    for batch, result in paired_results.items():
        ratios[f"pp2_over_pp1_batch_by_batch_b{batch}"] = result["ratio_median"]
        if "weight_read_median" in result:
            ratios[f"decode_weight_read_batch_by_batch_b{batch}"] = result["weight_read_median"]
        if "vs_hf_median" in result:
            ratios[f"pp1_over_hf_generate_batch_by_batch_b{batch}"] = result["vs_hf_median"]
    if ("pp1", 1) in decode_step_s:
        step = statistics.median(decode_step_s[("pp1", 1)])
        print(f"\npipeline 1 stage, batch 1: {step * 1e3:.1f} ms per decode step (median) = weights read at "
              f"{read_bytes / step / 1e9:.1f} GB/s")
    if paired_results:
        print(f"\nHF generate, one stage and two stages, batch by batch in the same two processes ({args.rounds} "
              "rounds, bench/paired.py):")
        for batch, result in paired_results.items():
            for line in describe_paired(result):
                print(f"  batch {batch}: {line}")
    targets = {"pp1_over_hf_generate": 1.25, "pp2_over_best_one_process": 0.95, "pp2_over_pp1_batch_by_batch": 0.95,
               "decode_weight_read": 0.60}
    print("\nratio (median over repeats, or rounds, of the ratio within each)   value   target   each repeat")
    for key, value in ratios.items():
        target = next(t for prefix, t in targets.items() if key.startswith(prefix))
        each = " ".join(f"{v:.3f}" for v in per_repeat.get(key, []))
        print(f"{key:60s} {value:6.2f}   >= {target:.2f} {'met' if value >= target else 'NOT met':7s}   {each}")
    print("\nper-rank split of the last repeat (s): compute / communication / wait")
    for (name, batch), ranks in sorted(splits.items()):
        cells = "; ".join(f"rank {r['rank']}: {r['compute_s']:.2f} / {r['comm_s']:.2f} / {r['wait_s']:.2f}"
                          for r in ranks)
        print(f"  {name:10s} b{batch}: {cells}")
    out = REPO / "bench" / "results" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cores": os.cpu_count(), "torch": torch.__version__},
                               "model": {"parameters": total_bytes // 4, **MODEL_CONFIG},
                               "new_tokens": args.new_tokens, "repeats": args.repeats,
                               "copy_bandwidth_bytes_per_s": copy_bw,
                               "stock_row_read_bytes_per_s": stock_read,
                               "tokens_per_s": {f"{n}/b{b}": v for (n, b), v in samples.items()},
                               "median_tokens_per_s": {f"{n}/b{b}": v for (n, b), v in median.items()},
                               "decode_step_s": {f"{n}/b{b}": v for (n, b), v in decode_step_s.items()},
                               "ratios": ratios, "ratios_per_repeat": per_repeat, "paired": paired_results,
                               "rank_split": {f"{n}/b{b}": v for (n, b), v in splits.items()}},
                              indent=2) + "\n")
    print(f"\nwrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
