"""The engines on one CUDA GPU, on a randomly initialised model of a real architecture (default: OpenLLaMA-3B v2).

What the CPU machine cannot show, measured in one process:
- greedy tokens of the reference engine (HF `generate`) and of one pipeline stage, compared row by row in
  fp32 (the correctness claim, on CUDA kernels) and in the timed dtype;
- tokens/s of HF `generate`, the reference engine and one pipeline stage, batch 1 and batch 8, each row
  generating exactly `--new-tokens` (an EOS id outside the vocabulary: with EOS a row of a random model that
  stops early costs its batch the same steps but counts fewer tokens, and fp16 engines stop different rows);
- the peak GPU memory of a long-context batch next to the planner's estimate (memory.py), per engine.

Two pipeline stages need two GPUs (NCCL refuses two ranks on one device), so they are not measured here.

    python -m bench.gpu [--config configs/models/open_llama_3b_v2.config.json] [--dtype float16] [--json OUT]

with distinfer installed (`pip install -e .`) or `PYTHONPATH=src`. About 3 minutes on an H100 for the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.experiments import experiment_file, run_specs
from distinfer.layout import split_layers
from distinfer.memory import GPU_ALLOCATOR, ModelFacts, estimate_stage_memory
from distinfer.models.loading import load_tokenizer
from distinfer.profiles import HARDWARE
from distinfer.prompts import load_prompts
from distinfer.runtime.engines import EngineContext, build_engine
from distinfer.runtime.pipeline import Batch, StopRule, eos_prefix
from distinfer.runtime.ranks import DistEnv
from distinfer.runtime.reference import ReferenceEngine, hf_generate
from distinfer.runtime.sampling import Sampler, SamplingParams
from distinfer.runtime.worker import make_batches, stop_rule

REPO = Path(__file__).resolve().parent.parent
PROMPTS = {1: 4, 8: 16}  # batch size -> prompts timed (four batches of 1, two of 8)


def build_model(config_path: Path, target: Path, dtype: torch.dtype) -> Path:
    """The architecture of config.json with random weights (initializer_range 0.02) and tiny-llama's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from distinfer.models.tiny import train_tokenizer

    tokenizer = train_tokenizer(add_bos=True)
    cfg = json.loads(config_path.read_text())
    cfg.update(pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.02)
    config = AutoConfig.for_model(**cfg)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    del model
    torch.cuda.empty_cache()
    return target


def engines(model_dir: Path, stop: StopRule, dtype: str, device: torch.device) -> dict:
    """name -> a function that builds the engine as a run does, through the engine registry (runtime/engines.py),
    from the runs an experiment file of the model plans: the reference and one pipeline stage (one model on the
    device at a time)."""
    config = experiment_file(model_dir.parent / f"gpu-{dtype}.yaml", "gpu", batch_size=8,
                             model={"path": str(model_dir), "dtype": dtype}, parallel={"engine": ["reference", "pipeline"]})
    runs = {run.engine: run for run in run_specs(config)}
    tokenizer = load_tokenizer(model_dir)

    def build(engine: str):  # noqa: ANN202 - the registry's Engine
        spec = runs[engine]
        sampler = Sampler(SamplingParams(), device)
        return build_engine(EngineContext(spec, DistEnv(), device, tokenizer, model_dir.parent, stop, sampler))[0]

    return {"reference": lambda: build("reference"), "pp1": lambda: build("pipeline")}


def plain_generate(engine: ReferenceEngine, batch: Batch) -> list[list[int]]:
    """Plain `model.generate` on the reference engine's model (no per-step clock)."""
    out = hf_generate(engine.model, batch, engine.stop, engine.device)
    return [eos_prefix(row, engine.stop.eos_token_ids) for row in out.tolist()]


def tokens_per_s(generate, batches: list[Batch], repeats: int) -> float:  # noqa: ANN001
    """Median over repeats of (tokens generated / wall time) over the batches, after one warm-up batch."""
    generate(batches[0])
    rates = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start, tokens = time.perf_counter(), 0
        for b in batches:
            tokens += sum(len(row) for row in generate(b))
        torch.cuda.synchronize()
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def long_batch(rows: int, prompt_tokens: int, vocab: int) -> Batch:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (rows, prompt_tokens), generator=generator)
    return Batch(0, list(range(rows)), ids, torch.ones_like(ids))


def peak_memory(engine, batch: Batch) -> dict:  # noqa: ANN001
    """Peak bytes allocated and reserved by torch while generating `batch`, and what CUDA's context takes."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    engine.generate(batch)
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    reserved = torch.cuda.memory_reserved()
    return {"peak_allocated": torch.cuda.max_memory_allocated(), "peak_reserved": torch.cuda.max_memory_reserved(),
            "outside_torch": total - free - reserved}


def memory_check(engine, facts: ModelFacts, dtype: str, rows: int, prompt: int, new: int) -> dict:  # noqa: ANN001
    """Peak memory of one long batch (random prompt ids, `new` tokens: the timed engines have no EOS) next to
    the planner's estimate for the same batch and context."""
    engine.stop = dataclasses.replace(engine.stop, max_new_tokens=new)
    measured = peak_memory(engine, long_batch(rows, prompt, facts.vocab))
    estimate = estimate_stage_memory(facts, split_layers(facts.layers, 1, None)[0], dtype, rows, prompt + new,
                                     HARDWARE["t4-16gb"].memory_bytes, gpu=True)
    needed = measured["peak_reserved"] + measured["outside_torch"]
    return {**measured, "estimate": estimate.total, "weights": estimate.weights, "kv_cache": estimate.kv_cache,
            "activations": estimate.activations, "measured_over_estimate": round(needed / estimate.total, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs/models/open_llama_3b_v2.config.json")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long", default="8x1792+256", help="rows x prompt tokens + new tokens of the memory check")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", GPU_ALLOCATOR)  # as the job scripts do, before CUDA starts
    device = torch.device("cuda")
    rows_s, rest = args.long.split("x")
    long_rows, (long_prompt, long_new) = int(rows_s), map(int, rest.split("+"))
    cfg = json.loads(args.config.read_text())
    facts = ModelFacts.from_config(cfg)
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "config": str(args.config),
                    "allocator": os.environ["PYTORCH_CUDA_ALLOC_CONF"], "dtype": args.dtype,
                    "new_tokens": args.new_tokens, "parameters": facts.total_parameters()}
    prompts = load_prompts(REPO / "prompts" / "correctness.jsonl")
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", args.dtype):  # fp32: token equality; then the timed dtype
            model_dir = build_model(args.config, Path(tmp) / dtype, getattr(torch, dtype))
            tokenizer = load_tokenizer(model_dir)
            batches = {b: make_batches(prompts[:n], tokenizer, b) for b, n in PROMPTS.items()}
            stop = stop_rule(model_dir, tokenizer, args.new_tokens)
            outputs: dict[str, list] = {}
            for name, build in engines(model_dir, stop, dtype, device).items():
                engine = build()
                outputs[name] = [engine.generate(b).tokens for b in batches[8]]
                if dtype == args.dtype:  # timed on equal work: every row generates --new-tokens
                    del engine
                    torch.cuda.empty_cache()
                    timing_stop = dataclasses.replace(stop, eos_token_ids=(facts.vocab,))
                    engine = engines(model_dir, timing_stop, dtype, device)[name]()
                    for b, bs in batches.items():
                        result[f"{name}_b{b}_tok_s"] = tokens_per_s(lambda x, e=engine: e.generate(x).tokens, bs,
                                                                    args.repeats)
                        if name == "reference":
                            result[f"hf_generate_b{b}_tok_s"] = tokens_per_s(
                                lambda x, e=engine: plain_generate(e, x), bs, args.repeats)
                    result[f"{name}_memory"] = memory_check(engine, facts, dtype, long_rows, long_prompt, long_new)
                del engine
                torch.cuda.empty_cache()
            rows = [(a, b) for x, y in zip(outputs["reference"], outputs["pp1"], strict=True)
                    for a, b in zip(x, y, strict=True)]
            result[f"equal_rows_{dtype}"] = f"{sum(a == b for a, b in rows)}/{len(rows)}"
    for b in (1, 8):
        result[f"pp1_over_hf_generate_b{b}"] = round(result[f"pp1_b{b}_tok_s"] / result[f"hf_generate_b{b}_tok_s"], 3)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
