"""LlamaDecoder (runtime/cpu/llama_decode.py) against `transformers`' own Llama layers, on the real tiny Llama.

The tiny Llama has grouped-query attention (8 heads, 4 key/value heads), so both of the decoder's attention
branches run: no padding (SDPA's own GQA) and left padding (a mask, queries packed per key/value head). The
PyTorch path must be bit-equal; the C++ ops (compiled here for real, with the machine's g++) sum in another
order and must agree to fp32 rounding.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from distinfer.models.families import family_of
from distinfer.models.loading import load_full_model
from distinfer.runtime.cpu.cpp_ops import decode_ops
from distinfer.runtime.cpu.kernels import use_fast_cpu_linears
from distinfer.runtime.cpu.llama_decode import LlamaDecoder, llama_decoder
from distinfer.runtime.pipeline import prefill_positions


def _decode_both(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int,  # noqa: ANN001
                 compiled: bool = False) -> list[tuple]:
    """Prefill through transformers' layers, then `steps` decode steps through both paths on the same inputs."""
    dtype = model.dtype
    family, decoder = family_of(model), llama_decoder(model, compiled)
    assert isinstance(decoder, LlamaDecoder) and (decoder.ops is not None) == compiled
    rows = input_ids.shape[0]
    positions, cache = prefill_positions(attention_mask), DynamicCache()
    pairs = []
    with torch.inference_mode():
        kwargs = family.layer_kwargs(model, tuple(input_ids.shape), dtype, attention_mask, positions, cache)
        family.run_layers(model, family.embed(model, input_ids, positions), kwargs)
        kv = decoder.adopt(cache, rows, input_ids.shape[1] + steps)
        for _ in range(steps):
            hidden = torch.randn(rows, 1, model.config.hidden_size, dtype=dtype)
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=-1)
            positions = positions[:, -1:] + 1
            kwargs = family.layer_kwargs(model, (rows, 1), dtype, attention_mask, positions, cache)
            expected = family.run_layers(model, hidden, kwargs)
            pairs.append((expected, decoder.run(hidden, decoder.prepare(attention_mask, positions), kv)))
    assert kv.length == input_ids.shape[1] + steps
    return pairs


def _cases() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    input_ids = torch.randint(3, 200, (3, 7))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding
    attention_mask[2, :1] = 0
    return {"one row": (input_ids[:1], attention_mask[:1]), "padded rows": (input_ids, attention_mask),
            "one-token prompt": (input_ids[:1, -1:], attention_mask[:1, -1:])}


@pytest.mark.parametrize(("dtype", "fast_linears"), [("float32", False), ("float32", True), ("bfloat16", False)])
def test_decode_steps_are_bit_equal_to_transformers_layers(tiny_models, dtype: str, fast_linears: bool) -> None:  # noqa: ANN001,E501
    model = load_full_model(tiny_models["tiny-llama"], dtype, torch.device("cpu"))
    if fast_linears:
        use_fast_cpu_linears(model, splits=2)
    for name, (ids, mask) in _cases().items():
        for step, (expected, got) in enumerate(_decode_both(model, ids, mask, steps=5)):
            assert torch.equal(expected, got), f"{name}, decode step {step}: {(expected - got).abs().max()}"


def test_cpp_decode_ops_agree_with_transformers_layers_to_rounding(tiny_models) -> None:  # noqa: ANN001
    assert decode_ops() is not None, "the C++ decode ops did not build (is g++ installed? see the log)"
    model = load_full_model(tiny_models["tiny-llama"], "float32", torch.device("cpu"))
    use_fast_cpu_linears(model, splits=2)
    for name, (ids, mask) in _cases().items():
        for step, (expected, got) in enumerate(_decode_both(model, ids, mask, steps=5, compiled=True)):
            scale = float(expected.abs().max())  # fp32 rounding through 8 layers of random hidden states
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale, msg=f"{name}, step {step}")


def test_cpp_decode_ops_reject_what_they_cannot_read() -> None:
    ops = decode_ops()
    assert ops is not None
    with pytest.raises(RuntimeError, match="x must be a contiguous fp32 CPU tensor"):
        ops.rms_norm(torch.ones(2, 4, dtype=torch.float64), torch.ones(4), 1e-6)
    with pytest.raises(RuntimeError, match="w must have 4 elements"):
        ops.rms_norm(torch.ones(2, 4), torch.ones(3), 1e-6)
    keys = torch.zeros(1, 2, 3, 4)
    args = (torch.ones(1, 8), torch.ones(1, 8), torch.ones(1, 8), keys, keys.clone(), torch.ones(1, 4),
            torch.ones(1, 4), torch.empty(0, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="position 3 outside the cache's 3"):
        ops.rope_attend(*args, 3, 0.5)
    out = ops.rope_attend(*args, 0, 0.5)  # one position: attention returns that position's value
    torch.testing.assert_close(out, torch.ones(1, 8))


def test_only_plain_llama_layers_take_the_decoder(tiny_models) -> None:  # noqa: ANN001
    from transformers import AutoConfig, AutoModelForCausalLM

    assert llama_decoder(load_full_model(tiny_models["tiny-gpt2"], "float32", torch.device("cpu"))) is None
    config = AutoConfig.from_pretrained(tiny_models["tiny-llama"])
    assert llama_decoder(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")) is not None
    eager = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    assert llama_decoder(eager) is None
    config.rope_parameters = {**config.rope_parameters, "rope_type": "dynamic", "factor": 2.0}
    assert llama_decoder(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")) is None


def test_a_full_cache_is_an_error_not_a_silent_overwrite(tiny_models) -> None:  # noqa: ANN001
    model = load_full_model(tiny_models["tiny-llama"], "float32", torch.device("cpu"))
    decoder = llama_decoder(model)
    kv = decoder.adopt(None, 1, 2)
    mask, hidden = torch.ones(1, 1, dtype=torch.long), torch.randn(1, 1, model.config.hidden_size)
    with torch.inference_mode():
        for position in range(2):
            mask = torch.ones(1, position + 1, dtype=torch.long)
            decoder.run(hidden, decoder.prepare(mask, torch.tensor([[position]])), kv)
        with pytest.raises(RuntimeError, match="KV cache full: 2 positions"):
            decoder.run(hidden, decoder.prepare(torch.ones(1, 3, dtype=torch.long), torch.tensor([[2]])), kv)


def test_decode_layers_in_one_cpp_call_are_bit_equal_to_the_op_by_op_path(tiny_models) -> None:  # noqa: ANN001
    """With linear_rows chosen for every layer, a step runs all layers in one C++ call (`DecodeLayers`): the same
    ops in the same order as the op-by-op C++ path, so bit-equal to it, for one row and for padded rows."""
    ops = decode_ops()
    assert ops is not None
    model = load_full_model(tiny_models["tiny-llama"], "float32", torch.device("cpu"))
    use_fast_cpu_linears(model, splits=2)
    for layer in model.modules():
        if hasattr(layer, "few_rows"):
            layer.one_row, layer.few_rows, layer.ops = "cpp", "cpp", ops
    one_call, op_by_op = llama_decoder(model), llama_decoder(model)
    assert one_call._stack is not None and list(one_call.one_call_rows) == list(range(1, 25))
    op_by_op._stack = None
    for name, (ids, mask) in _cases().items():
        rows, width = ids.shape
        kvs = [decoder.adopt(None, rows, width + 4) for decoder in (one_call, op_by_op)]
        for kv in kvs:  # the same random history in both caches
            torch.manual_seed(1)
            for keys, values in zip(kv.keys, kv.values):
                keys.normal_()
                values.normal_()
            kv.length = width
        positions = prefill_positions(mask)[:, -1:]
        for step in range(4):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            positions = positions + 1
            hidden = torch.randn(rows, 1, model.config.hidden_size)
            got, expected = (d.run(hidden, d.prepare(mask, positions), kv) for d, kv in zip((one_call, op_by_op), kvs))
            assert torch.equal(got, expected), f"{name}, step {step}: {(got - expected).abs().max()}"
        assert all(torch.equal(a, b) for a, b in zip(kvs[0].keys, kvs[1].keys)), name
    for layer in model.modules():  # another kernel chosen for one row: one-row steps go op by op again
        if hasattr(layer, "few_rows"):
            layer.one_row = "mkl"
    assert list(llama_decoder(model).one_call_rows) == list(range(2, 25))
