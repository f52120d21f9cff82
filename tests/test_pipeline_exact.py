"""Pipeline-parallel generation equals single-device `transformers` generate, token for token (fp32, greedy).

Real multi-process runs: 1, 2 and 3 spawned ranks talking over shared-memory rings and gloo, for the tiny
Llama and the tiny GPT-2. Compared on the same batch composition and left padding as the reference.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import spawn_ranks
from pp_harness import PROMPTS

from distinfer.models.families import family_of
from distinfer.models.loading import count_parameters, load_full_model, load_tokenizer
from distinfer.prompts import load_prompts
from distinfer.runtime.pipeline import StopRule, eos_prefix
from distinfer.runtime.reference import hf_generate as reference_generate
from distinfer.runtime.sampling import SamplingParams
from distinfer.runtime.worker import make_batches

MAX_NEW = 16
GREEDY = SamplingParams()
SAMPLED = SamplingParams(greedy=False, temperature=0.8, top_k=50, top_p=0.9, seed=7)
LAYOUTS = {1: [None], 2: [None, [3, 5]], 3: [None, [1, 5, 2], [2, 2, 4]]}
BATCHING = [(1, 1), (4, 1), (4, 2)]  # (batch size, micro-batches)


def hf_generate(model_dir: Path, batch_size: int, eos: int | None = None) -> list[list[int]]:
    """The reference: HF generate per batch, cut after the first EOS like the engine's output."""
    tok = load_tokenizer(model_dir)
    model = load_full_model(model_dir, "float32", torch.device("cpu"))
    eos_id = eos if eos is not None else tok.eos_token_id
    out: list[list[int]] = []
    stop = StopRule(MAX_NEW, (eos_id,), tok.pad_token_id)
    for batch in make_batches(load_prompts(PROMPTS), tok, batch_size):
        for row in reference_generate(model, batch, stop, torch.device("cpu")).tolist():
            out.append(eos_prefix(row, (eos_id,)))
    return out


def expected_stage_params(model_dir: Path, start: int, stop: int, first: bool, last: bool) -> int:
    model = load_full_model(model_dir, "float32", torch.device("cpu"))
    if first and last:
        return count_parameters(model)
    family = family_of(model)
    total = sum(count_parameters(layer) for layer in family.decoder_layers(model)[start:stop])
    owned = (family.first if first else ()) + (family.last if last else ())
    return total + sum(count_parameters(model.get_submodule(name)) for name in owned)


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def model_case(request, tiny_models):  # noqa: ANN001
    model_dir = tiny_models[request.param]
    references = {bs: hf_generate(model_dir, bs) for bs in (1, 4)}
    # An EOS that really occurs, so that early stopping of rows and micro-batches is exercised.
    common = Counter(t for row in references[4] for t in row[2:]).most_common(1)[0][0]
    references["eos"] = hf_generate(model_dir, 4, eos=common)
    cases = {}
    for world, layouts in LAYOUTS.items():
        cases[world] = [(counts, bs, mb, GREEDY, None) for counts in layouts for bs, mb in BATCHING]
        cases[world].append((None, 4, 2, GREEDY, common))
        cases[world] += [(None, 4, 2, SAMPLED, None), (None, 1, 1, SAMPLED, None)] if world <= 2 else []
    out = spawn_ranks(model_dir, cases, MAX_NEW)
    results = {world: (cases[world], out[world]) for world in cases}
    return model_dir, references, results, common


def test_greedy_equals_hf_generate_for_every_layout(model_case) -> None:  # noqa: ANN001
    model_dir, references, results, _ = model_case
    checked, one_call, paths = 0, set(), set()
    for world, (cases, out) in results.items():
        for index, (counts, bs, mb, params, eos) in enumerate(cases):
            if params is not GREEDY or eos is not None:
                continue
            tokens = out[index][0]
            assert len(tokens) == 20
            assert tokens == references[bs], f"pp={world} layers={counts} batch={bs} microbatches={mb}"
            checked += 1
            rows = {tuple(facts["one_call_rows"]) for facts in out[index][1]}  # pp_harness: even cases, linear_rows
            one_call |= {(bs // mb, world)} if rows == {tuple(range(1, 25))} else set()
            paths |= {(world, *message_paths(index, out[index][1]))}
    assert checked == 3 * (1 + 2 + 3)
    # pp_harness: shared-memory rings, gloo alone, and small rings (prefill over gloo, decode steps through rings)
    assert paths == {(1, "none", False, False)} | {(w, *p) for w in (2, 3) for p in
                                                 [("shared memory", True, False), ("gloo", False, True),
                                                  ("shared memory", True, True)]}, paths
    if model_dir.name == "tiny-llama":  # whole decode steps in one C++ call at one row and at two, every pp
        assert {(1, w) for w in LAYOUTS} <= one_call and {(2, w) for w in LAYOUTS} <= one_call, one_call


def message_paths(index: int, stages: list[dict]) -> tuple[str, bool, bool]:
    """(transport, any message through a ring, any through gloo) of one case, the same on every stage."""
    seen = {(s["transport"], s["messages"]["ring"] > 0, s["messages"]["backend"] > 0) for s in stages}
    assert len(seen) == 1, f"case {index}: stages differ: {seen}"
    return seen.pop()


def test_eos_stops_rows_like_hf_generate(model_case) -> None:  # noqa: ANN001
    _, references, results, eos = model_case
    stopped = [row for row in references["eos"] if row and row[-1] == eos]
    assert stopped and any(len(r) < MAX_NEW for r in stopped), "the chosen EOS must end some completions early"
    for world, (cases, out) in results.items():
        index = next(i for i, c in enumerate(cases) if c[4] == eos)
        assert out[index][0] == references["eos"], f"pp={world}"


def test_seeded_sampling_is_the_same_for_pp1_and_pp2(model_case) -> None:  # noqa: ANN001
    _, references, results, _ = model_case
    sampled = {}
    for world in (1, 2):
        cases, out = results[world]
        for index, (_, bs, mb, params, _) in enumerate(cases):
            if params is SAMPLED:
                sampled[(world, bs, mb)] = out[index][0]
    assert sampled[(1, 4, 2)] == sampled[(2, 4, 2)]
    assert sampled[(1, 1, 1)] == sampled[(2, 1, 1)]
    assert sampled[(1, 4, 2)] != references[4], "sampling should differ from greedy"


def test_each_stage_holds_only_its_layers(model_case) -> None:  # noqa: ANN001
    model_dir, _, results, _ = model_case
    full = count_parameters(load_full_model(model_dir, "float32", torch.device("cpu")))
    for world in (2, 3):
        cases, out = results[world]
        for index, (counts, *_rest) in enumerate(cases):
            stages = out[index][1]
            assert [s["start"] for s in stages][0] == 0 and stages[-1]["stop"] == 8
            for s in stages:
                assert s["params"] == expected_stage_params(model_dir, s["start"], s["stop"], s["first"], s["last"])
                assert s["params"] < full, f"stage {s} holds the whole model"


def test_bench_paired_harness_compares_token_equal_engines(tiny_models, monkeypatch) -> None:  # noqa: ANN001
    """bench/paired.py (part of `make bench`) runs HF generate, one stage and two stages (1 and 2 micro-batches)
    batch by batch in two real gloo ranks and fails if their tokens differ; here on the tiny Llama, 2 rounds."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))  # spawned ranks import bench.paired
    from bench import paired

    results = paired.measure(tiny_models["tiny-llama"], [1, 4], rounds=2, new_tokens=8, microbatches=[2])
    assert set(results) == {1, 4}
    assert set(results[1]["median_tokens_per_s"]) == {"hf-generate", "pp1", "pp2-mb1"}
    assert set(results[4]["median_tokens_per_s"]) == {"hf-generate", "pp1", "pp2-mb1", "pp2-mb2"}
    for summary in results.values():
        assert summary["rounds"] == 2 and all(r > 0 for r in summary["ratios"]) and len(summary["vs_hf"]) == 2
    # batch 1 also times the one-stage decode against a copy bandwidth measured just before, round by round
    assert len(results[1]["weight_read"]) == 2 and all(0 < r < 10 for r in results[1]["weight_read"])
    assert "weight_read" not in results[4]
    # and the time of the one-stage model's linear products alone, against which HF generate's speed is bounded
    assert len(results[1]["vs_hf_bound"]) == 2 and results[1]["linear_floor_s_median"] > 0
    assert "vs_hf_bound" not in results[4]
