"""What a pipeline handoff costs the stage that takes over: one stage's decode, paused after half its layers.

On a machine where two pipeline stages share the cores, each stage sits idle while the other computes
(about 9 ms a step on `make bench`'s model), then runs its layers again. This script runs the bench
model's decode as one pipeline stage (the kernels and huge-page weights of a run, threads pinned) and,
after the first half of the decoder layers (6 of 12), hands the cores over for `--pause-ms` in one of five
ways, round-robin:

  none      no pause (the one-stage pipeline)
  sleep     this process sleeps; the cores idle
  work      this process's own threads keep working: a small in-cache add on every core, in a loop
  spin      two helper processes, one per core, spin in Python (another process runs, no memory traffic)
  stream    two helper processes read a `--stream-mb` buffer (another process streams memory, as the other
            stage does when it reads its weights)

It prints the median time of every layer for each way, and the sum over the layers after the pause
minus the same layers without one: the cost of one handoff to the stage that takes over. On the 2-vCPU
2-vCPU Xeon VM every way of pausing cost about the same .

    python -m bench.interference [--rounds 4] [--pause-ms 9] [--stream-mb 160] [--model DIR]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from multiprocessing.connection import Connection
from pathlib import Path

from distinfer.runtime.cpu.openmp import SHARED_NODE_SPINCOUNT  # noqa: E402

os.environ.setdefault("GOMP_SPINCOUNT", SHARED_NODE_SPINCOUNT)  # before OpenMP loads: as for two stages of a node
import torch  # noqa: E402

MODES = ("none", "sleep", "work", "spin", "stream")


def _helper(core: int, conn: Connection, stream_mb: int) -> None:
    """Wait for (mode, seconds); spin or stream memory for that long on `core`; answer."""
    os.sched_setaffinity(0, [core])
    torch.set_num_threads(1)
    buffer = torch.ones(stream_mb * 2**20 // 4)
    chunk = 4 * 2**20  # elements per read (16 MiB): the whole buffer is read again and again
    while (order := conn.recv()) is not None:
        mode, seconds = order
        end, offset = time.perf_counter() + seconds, 0
        while time.perf_counter() < end:
            if mode == "stream":
                buffer[offset : offset + chunk].sum()
                offset = (offset + chunk) % buffer.numel()
        conn.send(True)


def measure(model_dir: Path, rounds: int, pause_s: float, stream_mb: int, new_tokens: int) -> dict[str, list[float]]:
    """Median seconds per decoder layer (by index) for each mode; the pause comes after the first half."""
    from distinfer.layout import split_layers
    from distinfer.models.loading import load_stage_model
    from distinfer.models.profiles import model_layer_count
    from distinfer.runtime.cpu.threads import available_cores, pin_threads
    from distinfer.runtime.cpu import speed_up_stage

    cores = available_cores()
    helpers = []
    for core in cores[:2]:
        ours, theirs = multiprocessing.Pipe()
        process = multiprocessing.Process(target=_helper, args=(core, theirs, stream_mb), daemon=True)
        process.start()
        helpers.append((process, ours))
    try:
        pin_threads(cores)
        layout = split_layers(model_layer_count(model_dir), 1, None)[0]
        model, family = load_stage_model(model_dir, layout, "float32", torch.device("cpu"))
        speed_up_stage(model)  # a run's CPU stage: its kernels, huge pages (the layers run transformers' forward)
        layers = family.decoder_layers(model)
        half = len(layers) // 2
        started: dict[int, float] = {}
        scratch = torch.zeros(2**20)  # 4 MiB: big enough for every core to take part, small enough to stay cached
        times: dict[str, list[list[float]]] = {mode: [[] for _ in layers] for mode in MODES}
        mode = "none"

        def before(index: int) -> None:
            started[index] = time.perf_counter()

        def after(index: int) -> None:
            times[mode][index].append(time.perf_counter() - started[index])
            if index != half - 1 or mode == "none":
                return
            if mode == "sleep":
                time.sleep(pause_s)
                return
            if mode == "work":
                end = time.perf_counter() + pause_s
                while time.perf_counter() < end:
                    scratch.add_(1)
                return
            for _, conn in helpers:
                conn.send((mode, pause_s))
            for _, conn in helpers:
                conn.recv()

        for index, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda m, a, index=index: before(index))
            layer.register_forward_hook(lambda m, a, o, index=index: after(index))
        ids = torch.tensor([[1, 5, 9, 13]])
        with torch.inference_mode():
            for round_ in range(rounds + 1):
                for mode in MODES if round_ % 2 else MODES[::-1]:
                    if round_ == 0:
                        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up, not kept
                        times[mode] = [[] for _ in layers]
                        continue
                    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        # each generate's first forward is the prefill: drop it from every layer's list
        return {m: [statistics.median(t[1:]) for t in per_layer] for m, per_layer in times.items()}
    finally:
        for process, conn in helpers:
            conn.send(None)
            process.join(timeout=5)
            if process.is_alive():
                process.kill()


def main() -> None:
    from bench.model import build_model  # the bench's model, built once into the cache
    from distinfer.models.tiny import cache_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--pause-ms", type=float, default=9.0)
    parser.add_argument("--stream-mb", type=int, default=160)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--model", type=Path, help="a local model folder instead of the bench model")
    parser.add_argument("--cache", type=Path, default=cache_dir())
    args = parser.parse_args()
    medians = measure(args.model or build_model(args.cache), args.rounds, args.pause_ms / 1000, args.stream_mb,
                      args.new_tokens)
    half = len(medians["none"]) // 2
    for mode, per_layer in medians.items():
        extra = sum(per_layer[half:]) - sum(medians["none"][half:])
        print(f"{mode:6s} layers (us): {' '.join(f'{t * 1e6:.0f}' for t in per_layer)}; "
              f"layers {half + 1}-{len(per_layer)} against no pause: {extra * 1e6:+.0f} us")


if __name__ == "__main__":
    main()
