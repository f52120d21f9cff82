"""Two pipeline stages against one, batch by batch in the same two processes (part of `make bench`).

Separate `distinfer run`s of the two engines sit a minute apart, and this machine's speed drifts by up to
2x within minutes, so their ratio carries that drift. Here two ranks start once (gloo, threads pinned as
a run pins them) and, round after round, generate the same batch with one stage (rank 0 alone, every
core) and with two stages (one or more micro-batches), in alternating order. Each round gives a ratio
best-two-stage / one-stage tokens/s; the median and quartiles over the rounds are reported. Every round
also checks that the engines' tokens are equal. At batch 1, rank 0 also measures the memory copy bandwidth
(bench/bandwidth.py) at the start of each round, while rank 1 waits: the round's one-stage decode step (time
per token after the first) against that bandwidth gives a weight-read ratio free of the drift as well.

The engines are the ones a run builds (`load_stage_model`, `speed_up_stage`, `PipelineEngine`), without
the run's bookkeeping. With micro-batches the stages compute at once, so each
rank then uses its share of the cores, as `rank_cores(..., together=True)` gives it; OpenMP's worker threads keep
the cores they were started on (on the 2-core machine both layouts give the same cores).

Rank 0 also runs HF `generate` on the whole model (the stock `transformers` model, every core) in each
round, so that one stage against HF generate is measured side by side too, and its tokens are checked. At
batch 1 it also times, each round, one pass of one-row products through the one-stage model's linear layers
(runtime/cpu/kernels.py's `one_row_products_s`): no decode step can be shorter, so 1 / (that time x HF
generate's tokens/s) is the most one stage / HF generate can reach on this machine.

Like a run's ranks, the two ranks start with the OpenMP spin count a run's ranks sharing a node get
(runtime/cpu/openmp.py).

    python -m bench.paired [--rounds 16] [--batches 1,8] [--microbatches 2] [--new-tokens 32]
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
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.bandwidth import CopyBandwidth, decode_read_bytes
from distinfer.net import free_port
from distinfer.runtime.cpu.openmp import SHARED_NODE_SPINCOUNT

REPO = Path(__file__).resolve().parent.parent
PROMPTS_PER_BATCH_1 = 4  # batch 1 cycles through this many one-prompt batches, as bench.py does


class _HfGenerate:
    """HF generate with the engines' `generate(batch)` interface (tokens through EOS; no per-token times)."""

    def __init__(self, model_dir: Path, stop, device: torch.device) -> None:  # noqa: ANN001
        from distinfer.models.loading import load_full_model

        self.model = load_full_model(model_dir, "float32", device)
        self.stop, self.device = stop, device

    def generate(self, batch):  # noqa: ANN001, ANN201
        from distinfer.runtime.pipeline import BatchOutput, eos_prefix
        from distinfer.runtime.reference import hf_generate

        rows = hf_generate(self.model, batch, self.stop, self.device).tolist()
        tokens = [eos_prefix(row, self.stop.eos_token_ids) for row in rows]
        return BatchOutput(tokens=tokens, token_times=[[] for _ in tokens], start=0.0)


def _use_cores(cores: list[int]) -> None:
    """This rank's thread count and main-thread core for the next phase."""
    torch.set_num_threads(len(cores))
    os.sched_setaffinity(0, cores[:1])


def _rank(rank: int, options: dict) -> None:
    from distinfer.layout import split_layers
    from distinfer.models.loading import load_stage_model, load_tokenizer
    from distinfer.models.profiles import model_layer_count
    from distinfer.prompts import load_prompts
    from distinfer.runtime.cpu import speed_up_stage
    from distinfer.runtime.cpu.kernels import one_row_products_s
    from distinfer.runtime.cpu.threads import rank_cores
    from distinfer.runtime.dist import init_distributed, shutdown_distributed
    from distinfer.runtime.pipeline import PipelineEngine
    from distinfer.runtime.ranks import DistEnv
    from distinfer.runtime.sampling import Sampler, SamplingParams
    from distinfer.runtime.worker import make_batches, stop_rule

    env = DistEnv(rank=rank, world_size=2, local_rank=rank, local_world_size=2, master_port=options["port"])
    alone, shared = rank_cores(rank, rank, 2, False), rank_cores(rank, rank, 2, True)  # before pinning narrows it
    device = init_distributed(env, timeout_s=600, ranks_compute_together=False)
    model_dir = Path(options["model"])
    tokenizer = load_tokenizer(model_dir)
    stop = stop_rule(model_dir, tokenizer, options["new_tokens"])
    layers = model_layer_count(model_dir)

    def stage(world: int, r: int):  # noqa: ANN202
        model, family = load_stage_model(model_dir, split_layers(layers, world, None)[r], "float32", device)
        _, decoder = speed_up_stage(model, len(alone))  # as a run's stage does
        return model, family, decoder

    def engine(stage_parts, world: int, r: int, microbatches: int) -> PipelineEngine:  # noqa: ANN001
        model, family, decoder = stage_parts
        return PipelineEngine(model, family, r, world, device, Sampler(SamplingParams(), device), stop, microbatches,
                              decoder=decoder)

    half = stage(2, rank)
    whole = stage(1, 0) if rank == 0 else None
    read_bytes = decode_read_bytes(whole[0]) if whole else 0
    copier = CopyBandwidth() if whole else None
    phases: dict[str, tuple[PipelineEngine | _HfGenerate | None, list[int]]] = {
        "hf-generate": (_HfGenerate(model_dir, stop, device) if whole else None, alone),
        "pp1": (engine(whole, 1, 0, 1) if whole else None, alone),
        "pp2-mb1": (engine(half, 2, rank, 1), alone),
    }
    for k in options["microbatches"]:
        phases[f"pp2-mb{k}"] = (engine(half, 2, rank, k), shared)
    prompts = load_prompts(Path(options["prompts"]))
    results: dict = {}
    for batch_size in options["batches"]:
        count = PROMPTS_PER_BATCH_1 if batch_size == 1 else batch_size
        batches = make_batches(prompts[:count], tokenizer, batch_size)
        names = [n for n in phases if batch_size > 1 or not n.startswith("pp2-mb") or n == "pp2-mb1"]  # rows
        per_round: list[dict[str, float]] = []
        weight_read: list[float] = []  # batch 1: bytes read per decode step / copy bandwidth, round by round
        floors: list[float] = []  # batch 1: one pass of the one-stage model's linear products, round by round
        for round_ in range(options["rounds"] + 1):  # round 0 warms up
            batch = batches[round_ % len(batches)]
            order = names if round_ % 2 == 0 else names[::-1]
            speeds, tokens = {}, {}
            # before the round's first engine, whichever it is (the order alternates), while rank 1 waits
            bandwidth = copier.measure() if copier and batch_size == 1 else 0.0
            floor = one_row_products_s(whole[0]) if whole and batch_size == 1 else 0.0
            for name in order:
                eng, cores = phases[name]
                _use_cores(cores)
                dist.barrier()
                if eng is not None:
                    start = time.perf_counter()
                    out = eng.generate(batch)
                    if out is not None:
                        tokens[name] = out.tokens
                        speeds[name] = sum(map(len, out.tokens)) / (time.perf_counter() - start)
                        times = out.token_times[0]
                        if name == "pp1" and bandwidth and round_ > 0 and len(times) > 1:
                            weight_read.append(read_bytes * (len(times) - 1) / (times[-1] - times[0]) / bandwidth)
                dist.barrier()
            if rank == 0:
                differs = [n for n in tokens if tokens[n] != tokens["pp1"]]
                if differs:
                    raise RuntimeError(f"batch {batch_size}, round {round_}: {differs} differ from pp1's tokens")
                if round_ > 0:
                    per_round.append(speeds)
                    if floor:
                        floors.append(floor)
        if rank == 0:
            results[batch_size] = {"speeds": per_round, "weight_read": weight_read, "linear_floor_s": floors}
    if rank == 0:
        Path(options["out"]).write_text(json.dumps(results))
    shutdown_distributed()


def _quartiles(values: list[float]) -> list[float]:
    low, _, high = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return [low, high]


def summarize(rounds: dict[str, list]) -> dict:
    """Median tokens/s of each engine, the median and quartiles of best-two-stage / one-stage per round and (when
    HF generate ran) of one-stage / HF generate, and (batch 1) of the per-round weight-read ratio."""
    per_round = rounds["speeds"]
    ratios = [max(v for n, v in speeds.items() if n.startswith("pp2")) / speeds["pp1"] for speeds in per_round]
    summary = {
        "median_tokens_per_s": {n: statistics.median(s[n] for s in per_round) for n in per_round[0]},
        "rounds": len(per_round),
        "ratio_median": statistics.median(ratios),
        "ratio_quartiles": _quartiles(ratios),
        "ratios": ratios,
    }
    if "hf-generate" in per_round[0]:
        vs_hf = [speeds["pp1"] / speeds["hf-generate"] for speeds in per_round]
        summary.update(vs_hf_median=statistics.median(vs_hf), vs_hf_quartiles=_quartiles(vs_hf), vs_hf=vs_hf)
        if rounds.get("linear_floor_s"):
            # one token per linear floor: the most one stage could do, against HF generate in the same round
            bound = [1 / (floor * speeds["hf-generate"]) for floor, speeds in zip(rounds["linear_floor_s"], per_round)]
            summary.update(vs_hf_bound_median=statistics.median(bound), vs_hf_bound=bound,
                           linear_floor_s_median=statistics.median(rounds["linear_floor_s"]))
    if rounds["weight_read"]:
        summary.update(weight_read_median=statistics.median(rounds["weight_read"]),
                       weight_read_quartiles=_quartiles(rounds["weight_read"]), weight_read=rounds["weight_read"])
    return summary


def describe(summary: dict) -> list[str]:
    """`summarize`'s figures for one batch size as lines of text (bench/paired.py and make bench print them)."""
    def median_and_quartiles(key: str) -> str:
        low, high = summary[f"{key}_quartiles"]
        return f"{summary[f'{key}_median']:.3f} (quartiles {low:.3f}-{high:.3f})"

    speeds = ", ".join(f"{n} {v:.1f}" for n, v in summary["median_tokens_per_s"].items())
    lines = [f"{speeds} tok/s; best two stages / one stage {median_and_quartiles('ratio')}, "
             f"{summary['rounds']} rounds"]
    if "vs_hf_median" in summary:
        lines.append(f"one stage / HF generate {median_and_quartiles('vs_hf')}")
    if "vs_hf_bound_median" in summary:
        lines.append(f"the one-stage model's linear products alone take {summary['linear_floor_s_median'] * 1e3:.1f} "
                     f"ms a token: one stage / HF generate could reach {summary['vs_hf_bound_median']:.3f} at most")
    if "weight_read_median" in summary:
        lines.append(f"one-stage decode weight reads / the round's copy bandwidth {median_and_quartiles('weight_read')}")
    return lines


def measure(model: Path, batches: list[int], rounds: int, new_tokens: int, microbatches: list[int]) -> dict[int, dict]:
    """Run the two ranks (with the spin count of ranks sharing a node); returns, per batch size, `summarize`'s
    figures."""
    spin = os.environ.get("GOMP_SPINCOUNT")
    os.environ["GOMP_SPINCOUNT"] = SHARED_NODE_SPINCOUNT
    ranks = None
    try:
        with tempfile.TemporaryDirectory(prefix="distinfer-paired-") as tmp:
            options = {"port": free_port(), "model": str(model), "new_tokens": new_tokens, "rounds": rounds,
                       "batches": batches, "microbatches": microbatches, "out": str(Path(tmp) / "pair.json"),
                       "prompts": str(REPO / "prompts" / "correctness.jsonl")}
            ranks = mp.start_processes(_rank, args=(options,), nprocs=2, start_method="spawn", join=False)
            while not ranks.join():  # raises, naming the rank, when one fails
                pass
            raw = json.loads((Path(tmp) / "pair.json").read_text())
    finally:
        for process in ranks.processes if ranks else []:  # stopped by PID, also when this process is interrupted
            if process.is_alive():
                process.kill()
                process.join()
        if spin is None:
            os.environ.pop("GOMP_SPINCOUNT", None)
        else:
            os.environ["GOMP_SPINCOUNT"] = spin
    return {int(b): summarize(rounds) for b, rounds in raw.items()}


def main() -> None:
    from bench.model import build_model  # the bench's model, built once into the cache
    from distinfer.models.tiny import cache_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--microbatches", default="2", help="micro-batch counts > 1 to try at batch > 1")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--cache", type=Path, default=cache_dir())
    args = parser.parse_args()
    results = measure(build_model(args.cache), [int(b) for b in args.batches.split(",")], args.rounds,
                      args.new_tokens, [int(k) for k in args.microbatches.split(",") if k])
    for batch, r in results.items():
        for line in describe(r):
            print(f"batch {batch}: {line}")

if __name__ == "__main__":
    main()
