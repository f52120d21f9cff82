"""The harness itself at scale: `distinfer plan` of a 1,000-run matrix and `distinfer analyze` of 10,000 bundles.

Neither needs a model to run: the plan is of OpenLLaMA-3B v2 on T4 nodes (its config.json ships in
configs/models/), and the bundles are synthetic (`write_synthetic_experiment`: the files a finished run
leaves, with plausible figures and 20 completions each, some runs failed). Prints the seconds each step
takes, through the library as the CLI calls it and through the CLI as a user runs it.

    python -m bench.harness [--runs 1000] [--bundles 10000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.experiments import experiment_file

REPO = Path(__file__).resolve().parent.parent
PROMPTS = 20
NEW_TOKENS = 32


def matrix_config(folder: Path, runs: int) -> Path:
    """An experiment of about `runs` runs: batch sizes x stages x micro-batches x precisions on T4 nodes."""
    batches = list(range(2, 2 + max(1, runs // 20)))  # x 5 stage counts x 2 micro-batch counts x 2 dtypes
    return experiment_file(
        folder / "matrix.yaml", "harness-plan",
        model={"path": "/cluster/models/open_llama_3b_v2",
               "config": str(REPO / "configs/models/open_llama_3b_v2.config.json"), "dtype": ["float16", "float32"]},
        parallel={"engine": "pipeline", "pp": [1, 2, 4, 8, 13], "microbatches": [1, 2]}, batch_size=batches,
        cluster={"profile": "t4-16gb", "gpus_per_node": 1, "partition": "t4"})


def _latency(rng: random.Random, base: float) -> dict:
    p50 = base * rng.uniform(0.9, 1.1)
    return {"mean": p50 * 1.02, "p50": p50, "p90": p50 * 1.2, "p99": p50 * 1.5}


def write_synthetic_experiment(root: Path, name: str, bundles: int, seed: int = 0, study: str = "strong-scaling",
                               model: Path | None = None, prompts: Path | None = None) -> Path:
    """root/name/ with `bundles` run folders as finished runs leave them (run.json, summary.json, per-rank
    metrics, completions.jsonl); one in fifty failed. Runs vary engine, stages, batch, micro-batches, precision
    and repeat index, so that the tables have groups to compare. With `model` (a model folder) and `prompts`
    (their file) in run.json, the analysis predicts the runs too."""
    from distinfer.bundle import BUNDLE_SCHEMA

    rng = random.Random(seed)
    folder = root / name
    folder.mkdir(parents=True)
    reference_tokens = [[rng.randrange(4096) for _ in range(NEW_TOKENS)] for _ in range(PROMPTS)]
    for index in range(bundles):
        engine = "reference" if index % 10 == 0 else "pipeline"
        pp = 1 if engine == "reference" else 1 + index % 4
        batch, mb = (1, 2, 4, 8)[index // 4 % 4], 1 + index // 16 % 2
        mb = min(mb, batch) if engine == "pipeline" else 1
        precision = ("float32", "float16")[index // 32 % 2]
        run_id = f"{engine}-pp{pp}-b{batch}-mb{mb}-{precision}-r{index}"
        run = {"experiment": name, "run_id": run_id, "engine": engine, "pp": pp, "tp": 1, "microbatches": mb,
               "batch_size": batch, "dtype": precision, "quantization": None, "num_prompts": None, "study": study,
               "repeats": 1, "builtin": "tiny-llama", "model_path": str(model or ""), "prompt_set": None,
               "prompts": str(prompts or ""), "trust_remote_code": False, "layers": None, "warmup": 1,
               "timeout_s": 600.0, "generation": {"max_new_tokens": NEW_TOKENS}}
        bundle = folder / run_id
        bundle.mkdir()
        (bundle / "run.json").write_text(json.dumps({
            "schema": BUNDLE_SCHEMA, "run": run, "config_hash": f"{index:016x}",
            "provenance": {"git_commit": "0" * 40, "packages": {"torch": "2.13.0"}, "hostname": "node1"},
            "runtime": {"hostnames": ["node1"], "device": "cpu"}}))  # every rank on one CPU machine
        if index % 50 == 49:
            (bundle / "summary.json").write_text(json.dumps({"status": "failed", "error": "rank 1: killed"}))
            continue
        tokens_per_s = 300.0 * batch / (1 + 0.1 * pp) * rng.uniform(0.9, 1.1)
        ranks = [{"rank": r, "layers": list(range(r * 2, r * 2 + 2)), "compute_s": rng.uniform(0.5, 1.0),
                  "comm_s": rng.uniform(0, 0.05), "wait_s": rng.uniform(0, 0.5),
                  "peak_memory_bytes": rng.randrange(1 << 28, 1 << 30)} for r in range(pp)]
        for rank in ranks:
            (bundle / f"metrics_rank_{rank['rank']}.json").write_text(json.dumps({**rank, "steps": []}))
        (bundle / "summary.json").write_text(json.dumps({
            "status": "ok", "error": None, "run_id": run_id, "engine": engine, "world_size": pp, "pp": pp, "tp": 1,
            "microbatches": mb, "batch_size": batch, "precision": precision, "context_tokens": None,
            "num_prompts": None, "perplexity": None, "output_tokens": PROMPTS * NEW_TOKENS,
            "output_tokens_per_s": tokens_per_s, "prompts_per_s": tokens_per_s / NEW_TOKENS,
            "wall_s": PROMPTS * NEW_TOKENS / tokens_per_s, "ttft_s": _latency(rng, 0.02 * pp),
            "tpot_s": _latency(rng, 0.003 * pp), "itl_s": _latency(rng, 0.003 * pp), "e2e_s": _latency(rng, 0.1),
            "load_s": 1.0, "ranks": ranks}))
        with (bundle / "completions.jsonl").open("w") as out:
            for prompt, ids in enumerate(reference_tokens):
                if engine != "reference" and rng.random() < 0.05:  # now and then a divergence
                    ids = ids[:5] + [0] + ids[6:]
                out.write(json.dumps({"id": f"p{prompt}", "prompt": "x", "output_token_ids": ids, "text": ""}) + "\n")
    return folder


def file_floor_s(folder: Path, runs: int) -> float:
    """Seconds this machine takes to create what a plan of `runs` runs must: a folder and two small files (temp
    file + rename) each, and nothing else: the floor under `plan`'s figure."""
    start = time.perf_counter()
    for index in range(runs):
        run = folder / f"r{index}"
        run.mkdir(parents=True)
        for name in ("run.json", "job.sbatch"):
            descriptor, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=run)
            os.write(descriptor, b"x" * 1500)
            os.close(descriptor)
            os.replace(temporary, run / name)
    return time.perf_counter() - start


def _seconds(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="runs of the planned matrix (about)")
    parser.add_argument("--bundles", type=int, default=10000, help="synthetic bundles to analyse")
    parser.add_argument("--keep", type=Path, help="write here and keep (default: a temporary folder, removed)")
    args = parser.parse_args()
    from distinfer.analysis.analyze import analyze
    from distinfer.jobs import plan_experiment
    from distinfer.spec import load_experiment

    work = args.keep or Path(tempfile.mkdtemp(prefix="distinfer-harness-"))
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "distinfer"]
    try:
        config = matrix_config(work, args.runs)
        start = time.perf_counter()
        planned = plan_experiment(load_experiment(config, require_model=False), config, work / "plan-library")
        plan_s = time.perf_counter() - start
        plan_cli_s = _seconds([*cli, "plan", str(config), "--outputs", str(work / "plan-cli")], work)
        floor_s = file_floor_s(work / "floor", len(planned))
        print(f"plan, {len(planned)} runs: {plan_s:.2f} s in the library ({plan_s / len(planned) * 1e3:.2f} ms a run),"
              f" {plan_cli_s:.2f} s through `distinfer plan` (interpreter start included); creating the same "
              f"folders and files alone took {floor_s:.2f} s here")

        start = time.perf_counter()
        folder = write_synthetic_experiment(work / "outputs", "harness-analyze", args.bundles)
        print(f"wrote {args.bundles} synthetic bundles in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        result = analyze(folder, work / "analysis-library")
        analyze_s = time.perf_counter() - start
        analyze_cli_s = _seconds([*cli, "analyze", str(folder), "--out", str(work / "analysis-cli")], work)
        print(f"analyze, {args.bundles} bundles ({result.runs} ok, {len(result.problems)} problems): "
              f"{analyze_s:.2f} s in the library, {analyze_cli_s:.2f} s through `distinfer analyze`")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
