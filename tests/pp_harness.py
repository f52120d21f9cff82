"""Spawned gloo ranks that run many pipeline configurations in one process group (real multi-process).

One spawn of the largest world runs every pipeline size: the cases of a `world`-stage pipeline run on ranks
0..world-1 over their own process group (the others wait), so the ranks start and import once.
Each case: (layer counts or None, batch size, micro-batches, sampling params, eos override). Stages run
with the engine's fast CPU linear kernels and, for Llama, its LlamaDecoder, as `distinfer run` does by
default: odd cases with the row-split one-row and oneDNN few-row kernels (steps op by op), even cases with
distinfer's `linear_rows` for every product (Llama steps then run as one C++ call, `DecodeLayers`). Messages
go through shared-memory rings (runtime/cpu/shm_ring.py) as in a run, over gloo alone in cases 1, 4, 7, ..., and in
cases 2, 5, 8, ... through rings of 8 KiB slots, so that prefill's hidden states take gloo and the decode steps'
the rings between the same two ranks.
Rank 0 puts {world: {case index: (tokens per prompt, stage facts per rank)}} on the queue.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from distinfer.layout import split_layers
from distinfer.models.loading import count_parameters, load_stage_model, load_tokenizer
from distinfer.models.profiles import model_layer_count
from distinfer.prompts import load_prompts
from distinfer.runtime import pipeline
from distinfer.runtime.cpu.cpp_ops import decode_ops
from distinfer.runtime.cpu.kernels import CpuLinear, use_fast_cpu_linears
from distinfer.runtime.cpu.llama_decode import llama_decoder
from distinfer.runtime.pipeline import RING_SLOT_BYTES, PipelineEngine, StopRule
from distinfer.runtime.sampling import Sampler
from distinfer.runtime.worker import make_batches

PROMPTS = Path(__file__).resolve().parent.parent / "prompts" / "correctness.jsonl"
SMALL_SLOTS = 8192  # the tiny models' prefill hidden states (rows x prompt x 256 x 4 bytes) do not fit


def rank_main(rank: int, port: int, model_dir: str, cases: dict[int, list], max_new: int,
              queue) -> None:  # noqa: ANN001
    world = max(cases)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    groups = {size: dist.new_group(list(range(size))) for size in sorted(cases) if 1 < size < world}
    results = {}
    for size, size_cases in sorted(cases.items()):
        if rank < size:
            results[size] = run_cases(rank, size, groups.get(size, dist.group.WORLD), Path(model_dir), size_cases,
                                      max_new)
    if rank == 0:
        queue.put(results)
    if world > 1:
        dist.destroy_process_group()


def run_cases(rank: int, world: int, group, model_dir: Path, cases: list, max_new: int) -> dict:  # noqa: ANN001
    """This rank's stage of every case on a `world`-stage pipeline over `group`; rank 0 returns the results."""
    tok = load_tokenizer(model_dir)
    prompts = load_prompts(PROMPTS)
    num_layers = model_layer_count(model_dir)
    results = {}
    for index, (counts, batch_size, microbatches, params, eos) in enumerate(cases):
        layout = split_layers(num_layers, world, counts)[rank]
        model, family = load_stage_model(model_dir, layout, "float32", torch.device("cpu"))
        # the engine's CPU kernels, set here rather than timed (a run times them and may pick others; test_units
        # checks each against nn.Linear): the row-split one-row path, or linear_rows everywhere in even cases
        use_fast_cpu_linears(model, splits=2)
        if index % 2 == 0:
            for linear in (m for m in model.modules() if isinstance(m, CpuLinear)):
                linear.one_row, linear.few_rows, linear.ops = "cpp", "cpp", decode_ops()
        decoder = llama_decoder(model)
        stop = StopRule(max_new, (eos if eos is not None else tok.eos_token_id,), tok.pad_token_id)
        pipeline.RING_SLOT_BYTES = SMALL_SLOTS if index % 3 == 2 else RING_SLOT_BYTES
        engine = PipelineEngine(model, family, rank, world, torch.device("cpu"), Sampler(params), stop, microbatches,
                                group=group, decoder=decoder, shared_memory=index % 3 != 1)
        tokens: list[list[int]] = []
        for batch in make_batches(prompts, tok, batch_size):
            out = engine.generate(batch)
            if out is not None:
                tokens.extend(out.tokens)
        facts = {"start": layout.start, "stop": layout.stop, "params": count_parameters(model),
                 "first": layout.is_first, "last": layout.is_last,
                 "one_call_rows": list(decoder.one_call_rows) if decoder else [], "transport": engine.transport,
                 "messages": dict(engine.messages)}
        gathered = [None] * world if rank == 0 else None
        if world > 1:
            dist.gather_object(facts, gathered, dst=0, group=group)
        else:
            gathered = [facts]
        if rank == 0:
            results[index] = (tokens, gathered)
    return results
