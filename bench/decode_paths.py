"""A one-stage pipeline's decode paths side by side in one process, with HF generate as the yardstick.

Each engine gets its own copy of the bench model (runtime/cpu/kernels.py's CPU kernels and 2 MiB pages, as a
run's stage has them) and differs only in how its decode steps run the layers (runtime/cpu/llama_decode.py):
`transformers`' forward, the LlamaDecoder with PyTorch operations, the LlamaDecoder with the C++ ops. HF
`generate` runs on the stock model (what `make bench` calls HF generate). Round after round every engine
generates the same batch, in a rotating order; tokens must be equal; each round gives its own ratios, so
the machine's drift cancels. Prints the median and quartiles of each path / HF generate and / transformers.

    .venv/bin/python -m bench.decode_paths --rounds 12
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

PATHS = ("cpp", "torch", "transformers")  # LlamaDecoder with C++ ops, with PyTorch ops, transformers' forward


def build_engines(model_dir: Path, new_tokens: int) -> dict[str, object]:
    from distinfer.layout import split_layers
    from distinfer.models.loading import load_full_model, load_stage_model, load_tokenizer
    from distinfer.models.profiles import model_layer_count
    from distinfer.runtime.cpu.llama_decode import llama_decoder
    from distinfer.runtime.pipeline import PipelineEngine, StopRule
    from distinfer.runtime.reference import ReferenceEngine
    from distinfer.runtime.sampling import Sampler, SamplingParams
    from distinfer.runtime.cpu import speed_up_stage

    tokenizer = load_tokenizer(model_dir)
    stop = StopRule(new_tokens, (tokenizer.eos_token_id,), tokenizer.pad_token_id)
    cpu = torch.device("cpu")
    engines: dict[str, object] = {}
    for path in PATHS:
        model, family = load_stage_model(model_dir, split_layers(model_layer_count(model_dir), 1, None)[0],
                                         "float32", cpu)
        _, decoder = speed_up_stage(model)  # the C++ path where it builds, as a run's stage gets it
        if path == "cpp" and (decoder is None or decoder.ops is None):
            sys.exit("the C++ decode ops are unavailable here (see the warning above)")
        if path != "cpp":
            decoder = llama_decoder(model, compiled=False) if path == "torch" else None
        engines[path] = PipelineEngine(model, family, 0, 1, cpu, Sampler(SamplingParams()), stop, decoder=decoder)
    engines["hf-generate"] = ReferenceEngine(load_full_model(model_dir, "float32", cpu), cpu, Sampler(SamplingParams()), stop)
    return engines


def measure(engines: dict[str, object], batches: list, rounds: int) -> dict[str, list[float]]:
    """Tokens/s of each engine per round (after one warm-up round), the order rotating round by round."""
    names = list(engines)
    speeds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds + 1):
        batch = batches[round_ % len(batches)]
        tokens = {}
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            start = time.perf_counter()
            out = engines[name].generate(batch)
            elapsed = time.perf_counter() - start
            tokens[name] = out.tokens
            if round_:
                speeds[name].append(sum(map(len, out.tokens)) / elapsed)
        if any(t != tokens["transformers"] for t in tokens.values()):
            sys.exit(f"round {round_}: the engines' tokens differ")
    return speeds


def ratio_line(speeds: dict[str, list[float]], name: str, base: str) -> str:
    ratios = [a / b for a, b in zip(speeds[name], speeds[base])]
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    return f"{name} / {base} {median:.3f} (quartiles {q1:.3f}-{q3:.3f})"


def main() -> None:
    from bench.model import build_model

    from distinfer.models.loading import load_tokenizer
    from distinfer.models.tiny import cache_dir
    from distinfer.prompts import load_prompts
    from distinfer.runtime.cpu.threads import pin_threads, rank_cores
    from distinfer.runtime.worker import make_batches

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--cache", type=Path, default=cache_dir())
    args = parser.parse_args()
    pin_threads(rank_cores(0, 0, 1, False))  # as a run pins a rank alone on its node
    model_dir = build_model(args.cache)
    engines = build_engines(model_dir, args.new_tokens)
    prompts = load_prompts(Path(__file__).resolve().parent.parent / "prompts" / "correctness.jsonl")
    tokenizer = load_tokenizer(model_dir)
    for batch_size in (int(b) for b in args.batches.split(",")):
        batches = make_batches(prompts[: 4 if batch_size == 1 else batch_size], tokenizer, batch_size)
        speeds = measure(engines, batches, args.rounds)
        medians = ", ".join(f"{name} {statistics.median(v):.1f}" for name, v in speeds.items())
        print(f"batch {batch_size}, {args.rounds} rounds, tokens/s: {medians}")
        for name in PATHS:
            print(f"batch {batch_size}: {ratio_line(speeds, name, 'hf-generate')}")
        for name in PATHS[:-1]:
            print(f"batch {batch_size}: {ratio_line(speeds, name, 'transformers')}")


if __name__ == "__main__":
    main()
