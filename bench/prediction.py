"""The performance model against measurements: calibrated on one-stage runs only, predicted for 2 and 3 stages.

For each model (the built-in tiny Llama; `make bench`'s ~160 M Llama), in one run on this machine:
  1. the CPU probe (matrix products, memory copies, one small operation, a wake-up of another process),
     measured before any run starts;
  2. `distinfer run --local` of the pipeline engine over pp 1, 2, 3, micro-batches 1 and 2, batch 1, 2, 4, 8
     (micro-batches 2 from batch 2), `--new-tokens` tokens a prompt, greedy: the tiny Llama 32 prompts measured
     3 times a run (its batch of 8 takes a tenth of a second, which this shared machine's noise would swamp), the
     160 M Llama 8 prompts once; the whole sweep `--rounds` times, one round after the other, and each run's
     measurement is the median of its rounds (a shared machine's speed drifts from minute to minute: one
     measurement of a run can be 20-30 % off the next);
  3. calibration on the pp 1 runs alone (`distinfer.predict.calibrate`), then predictions of the pp 2 and pp 3
     runs from it;
prints predicted against measured output tokens/s and TPOT (p50) of every multi-stage run with its error, the
median and 90th percentile of the absolute errors per model and overall (goal: median <= 10 %, p90 <= 20 %), and
writes bench/results/prediction-<time>.json.

    python -m bench.prediction [--models tiny,bench] [--new-tokens 32] [--rounds 3] [--reuse DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from bench.experiments import experiment_file, run_local

REPO = Path(__file__).resolve().parent.parent
METRICS = ("tokens_per_s", "tpot")
MEASURED = {"tiny": (32, 3), "bench": (8, 1)}  # model -> (prompts, repeats)


def write_experiments(work: Path, name: str, model: dict, new_tokens: int, round_: int) -> list[Path]:
    """One experiment file per batch size, each with pp 1, 2, 3 and micro-batches 1 (and 2 from batch 2): the runs
    a prediction is checked on run right after the one-stage runs it is calibrated on, within a minute or two (this
    shared machine's speed drifts from minute to minute)."""
    count, repeats = MEASURED[name]
    lines = (REPO / "prompts" / "correctness.jsonl").read_text().splitlines()
    prompts = work / f"prompts-{name}.jsonl"
    prompts.write_text("\n".join(_renamed(lines[i % len(lines)], i) for i in range(count)) + "\n")
    configs = []
    for batch in (1, 2, 4, 8):
        configs.append(experiment_file(
            work / f"{name}-b{batch}-r{round_}.yaml", f"pred-{name}-b{batch}-r{round_}",
            model={**model, "dtype": "float32"}, reference="none", prompts=str(prompts),
            generation={"max_new_tokens": new_tokens, "sampling": "greedy"},
            parallel={"engine": "pipeline", "pp": [1, 2, 3], "microbatches": [1, 2] if batch > 1 else 1},
            batch_size=batch, benchmark={"warmup": 1, "repeats": repeats}))
    return configs


def _renamed(line: str, i: int) -> str:
    record = json.loads(line)
    return json.dumps({**record, "id": f"{record['id']}-{i}"})


def run_experiment(config: Path, outputs: Path) -> Path:
    proc = run_local(config, "--outputs", str(outputs))
    if proc.returncode != 0:
        raise RuntimeError(f"{config.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return outputs / yaml.safe_load(config.read_text())["name"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def evaluate(folders: list[Path], probe: dict) -> tuple[dict, list[dict]]:
    from distinfer.predict.calibrate import calibrate, errors, measured_runs, median_of_repeats, one_rank
    from distinfer.predict.hardware import LINKS
    from distinfer.predict.model import Efficiency, Machine
    from distinfer.profiles import HARDWARE

    machine = Machine(HARDWARE["cpu"], LINKS["10gbe"], probe, local=True)
    calibration = calibrate(folders, machine)
    efficiency = {e: Efficiency(**v) for e, v in calibration["efficiency"].items()}
    measured = median_of_repeats([m for folder in folders for m in measured_runs(folder)])
    split = [m for m in measured if not one_rank(m.run)]
    rows = [row for row in errors(split, machine, efficiency) if row["metric"] in METRICS]
    return calibration, rows


def summary(rows: list[dict]) -> dict[str, float]:
    errs = [abs(r["error"]) for r in rows]
    return {"runs": len({(r["experiment"], r["run_id"]) for r in rows}), "median": statistics.median(errs),
            "p90": percentile(errs, 0.9), "max": max(errs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,bench")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="times the whole sweep is measured (median of them)")
    parser.add_argument("--reuse", type=Path, help="a folder of an earlier run of this bench: predict its runs again")
    args = parser.parse_args()

    from bench.model import build_model
    from distinfer.models.tiny import build_tiny_model, cache_dir
    from distinfer.probes.cpu import measure_cpu

    work = args.reuse or Path(tempfile.mkdtemp(prefix="distinfer-prediction-"))
    probe_file = work / "probe.json"
    if args.reuse and probe_file.is_file():
        probe = json.loads(probe_file.read_text())
    else:
        probe = measure_cpu(fresh=True)
        probe_file.write_text(json.dumps(probe, indent=1))
    print(f"probe: {probe['cores']} cores, fp32 {probe['flops_1']['float32'] / 1e9:.0f} / "
          f"{probe['flops_all']['float32'] / 1e9:.0f} GFLOP/s (1 / all cores), reads (all cores) "
          + ", ".join(f"{size / 2**20:.0f} MiB {bw / 1e9:.0f} GB/s" for size, bw in probe["read_all"])
          + f", {probe['launch_s'] * 1e6:.1f} us an operation, hand-off between stages "
          f"{(probe['handoff_s'] or 0) * 1e6:.0f} us", flush=True)
    models = {"tiny": {"path": str(build_tiny_model("tiny-llama"))}, "bench": {"path": str(build_model(cache_dir()))}}
    results, everything = {}, []
    for name in args.models.split(","):
        configs = [c for r in range(args.rounds) for c in write_experiments(work, name, models[name], args.new_tokens, r)]
        folders = []
        for config in configs:
            folder = work / "outputs" / yaml.safe_load(config.read_text())["name"]
            if not (args.reuse and folder.is_dir()):
                started = time.time()
                folder = run_experiment(config, work / "outputs")
                print(f"{folder.name}: ran in {time.time() - started:.0f} s", flush=True)
            folders.append(folder)
        calibration, rows = evaluate(folders, probe)
        fit = calibration["fit"]["pipeline"]
        print(f"\n{name}: calibrated on {len(fit['runs'])} one-stage runs, medians of {args.rounds} rounds (median error "
              f"{fit['median_abs_error']:.1%}): " + ", ".join(f"{k} {v:.3g}" for k, v in
                                                              calibration["efficiency"]["pipeline"].items()))
        for warning in fit["warnings"]:  # a fit on its bounds or missing its own runs is no calibration
            print(f"  WARNING: fit not trusted: {warning}")
        print(f"{'run':30} {'metric':13} {'predicted':>10} {'measured':>10} {'error':>8}")
        for row in sorted(rows, key=lambda r: (r["metric"], r["run_id"])):
            print(f"{row['run_id']:30} {row['metric']:13} {row['predicted']:10.4g} {row['measured']:10.4g} "
                  f"{row['error']:+8.1%}")
        results[name] = {"calibration": calibration, "rows": rows,
                         "summary": {m: summary([r for r in rows if r["metric"] == m]) for m in METRICS}}
        everything += rows
    print(f"\n{'model':8} {'metric':13} {'runs':>5} {'median':>8} {'p90':>8} {'max':>8}")
    for name, result in results.items():
        for metric, s in result["summary"].items():
            print(f"{name:8} {metric:13} {s['runs']:5d} {s['median']:8.1%} {s['p90']:8.1%} {s['max']:8.1%}")
    total = summary(everything)
    print(f"{'all':8} {'both':13} {total['runs']:5d} {total['median']:8.1%} {total['p90']:8.1%} {total['max']:8.1%}"
          f"   (goal: median <= 10 %, p90 <= 20 %: {'met' if total['median'] <= 0.10 and total['p90'] <= 0.20 else 'NOT met'})")
    out = REPO / "bench" / "results" / f"prediction-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"probe": probe, "work": str(work), "results": results, "overall": total}, indent=1))
    print(f"wrote {out} (bundles under {work})")


if __name__ == "__main__":
    main()
