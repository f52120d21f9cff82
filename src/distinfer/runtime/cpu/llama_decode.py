"""Decode steps of a Llama stage without `transformers`' forward: the same arithmetic in fewer operations.

A batch-1 decode step on CPU reads every weight once, and everything between the linear products is
small work whose cost is PyTorch's per-operation overhead: `transformers`' Llama layers spend ~50
operations and a dozen module calls per layer on it (the mask, the rotary embedding's cos/sin, two `cat`s
for the cache, `rotate_half`'s slices and `cat`, RMSNorm as six operations). `LlamaDecoder` runs the same
layers' parameters with about a dozen operations per layer:

- cos and sin come from a table built once by the model's own rotary module (same values), and
  `rotate_half(x) * sin` is one gather of x with a sign folded into the sin table;
- each micro-batch's keys and values live in preallocated buffers (`StaticKV`) written in place; attention
  reads a view of the filled part;
- RMSNorm is `F.rms_norm` (bit-equal to `LlamaRMSNorm` in fp32), modules' `forward` is called directly;
- in fp32 with the C++ ops (runtime/cpu/cpp_ops.py, `csrc/decode_ops.cpp`), everything between the products
  is four calls per layer: rotary + cache write + attention, residual + norm, silu x up, residual + norm;
- where every linear layer runs distinfer's `linear_rows` for the step's rows (runtime/cpu/kernels.py's choice),
  the whole step is one C++ call (`csrc/decode_layers.cpp`: the same ops, no Python between layers).

Prefill (several positions) still runs through `transformers`' layers into a `DynamicCache`, which the
first decode step copies into a `StaticKV`. Only plain Llama decoder layers (`LlamaDecoderLayer`, SDPA
attention, a rotary embedding that depends on the position only) take this path; `llama_decoder` returns
None for anything else, and the engine keeps `transformers`' forward. With PyTorch operations the results
are bit-equal to `transformers`' layers (fp32 and bf16); the C++ ops sum in another order and agree to
fp32 rounding (tests/test_llama_decode.py: with and without padding, grouped-query attention; the
token-exact pipeline tests run with them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

POSITION_ONLY_ROPE = ("default", "linear", "llama3", "yarn")  # cos/sin depend on the position alone
# A step in one C++ call (`DecodeLayers`) needs linear_rows, and is faster than op by op with the same kernels:
# so a Llama stage takes linear_rows while it is at most this much slower than the fastest kernel timed
# (runtime/cpu/kernels.py `choose_kernels`); the margin covers the scatter of the chooser's first timing in a
# fresh process (docs/performance.md).
ONE_CALL_MARGIN = 1.10
_NO_MASK = torch.empty(0, dtype=torch.bool)


@dataclass
class StaticKV:
    """Keys and values of one micro-batch on one stage: per layer [rows, kv heads, capacity, head dim]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int  # positions filled

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0


@dataclass(frozen=True)
class DecodeInputs:
    """What a decode step's layers take besides the hidden states; built before they arrive."""

    cos: torch.Tensor  # [rows, 1, 1, head dim]
    sin: torch.Tensor  # sin with rotate_half's sign folded in
    mask: torch.Tensor | None  # [rows, 1, 1, positions] True = attend; None when no row is padded


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's pieces, looked up once (each `nn.Module` attribute lookup costs a microsecond)."""

    input_norm: Callable[[torch.Tensor], torch.Tensor]
    q: Callable[[torch.Tensor], torch.Tensor]
    k: Callable[[torch.Tensor], torch.Tensor]
    v: Callable[[torch.Tensor], torch.Tensor]
    o: Callable[[torch.Tensor], torch.Tensor]
    post_norm: Callable[[torch.Tensor], torch.Tensor]
    gate: Callable[[torch.Tensor], torch.Tensor]
    up: Callable[[torch.Tensor], torch.Tensor]
    down: Callable[[torch.Tensor], torch.Tensor]
    act: Callable[[torch.Tensor], torch.Tensor]
    input_norm_args: tuple[torch.Tensor, float]  # (weight, eps), for the C++ ops
    post_norm_args: tuple[torch.Tensor, float]

    @classmethod
    def of(cls, layer: nn.Module) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        first, second = layer.input_layernorm, layer.post_attention_layernorm
        return cls(_rms_norm(first), attn.q_proj.forward, attn.k_proj.forward, attn.v_proj.forward,
                   attn.o_proj.forward, _rms_norm(second), mlp.gate_proj.forward, mlp.up_proj.forward,
                   mlp.down_proj.forward, mlp.act_fn, (first.weight, first.variance_epsilon),
                   (second.weight, second.variance_epsilon))


def _rms_norm(norm: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`F.rms_norm` with the norm's weight: in fp32 bit-equal to LlamaRMSNorm, which in other dtypes computes in
    fp32 and casts back before the weight (then the module's own forward runs)."""
    if norm.weight.dtype != torch.float32:
        return norm.forward
    return partial(F.rms_norm, normalized_shape=(norm.weight.shape[0],), weight=norm.weight,
                   eps=norm.variance_epsilon)


class LlamaDecoder:
    """One stage's Llama decoder layers for steps of one new position per row. Build it after the model's
    linear layers are final (e.g. after `use_fast_cpu_linears`): it keeps their `forward` methods. With `ops`
    (runtime/cpu/cpp_ops.py `decode_ops`, fp32 on CPU) the work between the products runs in four C++ calls."""

    def __init__(self, model: nn.Module, ops: ModuleType | None = None) -> None:
        config = model.config
        self.layers = list(model.model.layers)
        self._parts = [_Layer.of(layer) for layer in self.layers]
        self.ops = ops
        self._like = self.layers[0].input_layernorm.weight  # the stage's dtype and device
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.scaling = attn.scaling
        self.rotary = model.model.rotary_emb
        half = self.head_dim // 2
        self._gather = torch.cat([torch.arange(half, self.head_dim), torch.arange(half)]).to(self._like.device)
        self._cos = self._sin = torch.empty(0)
        self._stack, self.one_call_rows = _decode_layers(self.layers, ops, self.scaling)  # rows run in one call

    @property
    def name(self) -> str:
        """What a rank's summary calls this decode path."""
        return "llama_decoder_cpp" if self.ops is not None else "llama_decoder"

    def _tables(self, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for positions 0..positions-1 (at least), computed by the model's rotary module."""
        if self._cos.shape[0] < positions:
            size = max(positions, 2 * self._cos.shape[0], 256)
            cos, sin = self.rotary(self._like, torch.arange(size, device=self._like.device)[None])
            half = self.head_dim // 2
            self._cos, self._sin = cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
        return self._cos, self._sin

    def adopt(self, cache: object, rows: int, capacity: int) -> StaticKV:
        """Buffers for `capacity` positions holding what `cache` (a DynamicCache after prefill, or None) holds."""
        shape = (rows, self.kv_heads, capacity, self.head_dim)
        kv = StaticKV([self._like.new_empty(shape) for _ in self.layers],
                      [self._like.new_empty(shape) for _ in self.layers], 0)
        for i, layer in enumerate(getattr(cache, "layers", ())[: len(self.layers)]):
            keys = getattr(layer, "keys", None)
            if keys is None or keys.numel() == 0:
                continue
            kv.length = keys.shape[2]
            kv.keys[i][:, :, : kv.length].copy_(keys)
            kv.values[i][:, :, : kv.length].copy_(layer.values)
        return kv

    def prepare(self, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> DecodeInputs:
        """Inputs of the step whose new position is `position_ids` [rows, 1]; `attention_mask` [rows, positions]
        covers every position so far and the new one (left padding = 0)."""
        cos, sin = self._tables(int(position_ids.max()) + 1)
        index = position_ids[:, 0]
        mask = None if bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]
        return DecodeInputs(cos[index][:, None, None, :], sin[index][:, None, None, :], mask)

    def run(self, hidden: torch.Tensor, inputs: DecodeInputs, kv: StaticKV) -> torch.Tensor:
        """The layers on `hidden` [rows, 1, hidden size]; appends this position's keys and values to `kv`."""
        at = kv.length
        if at >= kv.capacity:
            raise RuntimeError(f"KV cache full: {kv.capacity} positions")
        hidden = self._run_cpp(hidden, inputs, kv) if self.ops is not None else self._run_torch(hidden, inputs, kv)
        kv.length = at + 1
        return hidden

    def _run_torch(self, hidden: torch.Tensor, inputs: DecodeInputs, kv: StaticKV) -> torch.Tensor:
        rows, at = hidden.shape[0], kv.length
        for layer, keys, values in zip(self._parts, kv.keys, kv.values):
            hidden = hidden + self._attention(layer, layer.input_norm(hidden), inputs, keys, values, at, rows)
            h = layer.post_norm(hidden)
            hidden = hidden + layer.down(layer.act(layer.gate(h)) * layer.up(h))
        return hidden

    def _run_cpp(self, hidden: torch.Tensor, inputs: DecodeInputs, kv: StaticKV) -> torch.Tensor:
        """Per layer: the products through the linear layers (runtime/cpu/kernels.py), and between them rotary + cache
        write + attention, residual + norm, silu * up, residual + the next layer's norm in C++
        (`csrc/decode_ops.cpp`)."""
        ops, rows, at = self.ops, hidden.shape[0], kv.length
        cos, sin = inputs.cos.reshape(rows, -1), inputs.sin.reshape(rows, -1)
        mask = inputs.mask.reshape(rows, -1) if inputs.mask is not None else _NO_MASK
        if self._stack is not None and rows in self.one_call_rows:
            return self._stack.run(hidden, kv.keys, kv.values, cos, sin, mask, at)
        hidden = hidden.contiguous()
        h = ops.rms_norm(hidden, *self._parts[0].input_norm_args)
        following = [*self._parts[1:], None]
        for layer, after, keys, values in zip(self._parts, following, kv.keys, kv.values):
            attn = ops.rope_attend(layer.q(h), layer.k(h), layer.v(h), keys, values, cos, sin, mask, at, self.scaling)
            hidden, h = ops.add_rms_norm(hidden, layer.o(attn.view(rows, 1, -1)), *layer.post_norm_args)
            mlp = layer.down(ops.silu_mul(layer.gate(h), layer.up(h)))
            if after is None:
                return hidden + mlp
            hidden, h = ops.add_rms_norm(hidden, mlp, *after.input_norm_args)
        return hidden

    def _rotate(self, x: torch.Tensor, inputs: DecodeInputs) -> torch.Tensor:
        return x * inputs.cos + x.index_select(-1, self._gather) * inputs.sin

    def _attention(self, layer: _Layer, h: torch.Tensor, inputs: DecodeInputs, keys: torch.Tensor,
                   values: torch.Tensor, at: int, rows: int) -> torch.Tensor:
        q = self._rotate(layer.q(h).view(rows, 1, self.heads, self.head_dim).transpose(1, 2), inputs)
        k = self._rotate(layer.k(h).view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2), inputs)
        v = layer.v(h).view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        keys.narrow(2, at, 1).copy_(k)
        values.narrow(2, at, 1).copy_(v)
        k_all, v_all = keys.narrow(2, 0, at + 1), values.narrow(2, 0, at + 1)
        groups = self.heads // self.kv_heads
        if groups > 1 and inputs.mask is None:  # as transformers' SDPA attention does for one query
            out = F.scaled_dot_product_attention(q, k_all, v_all, scale=self.scaling, enable_gqa=True)
        else:
            q = q.reshape(rows, self.kv_heads, groups, self.head_dim) if groups > 1 else q
            out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=inputs.mask, scale=self.scaling)
        out = out.reshape(rows, self.heads, 1, self.head_dim).transpose(1, 2).reshape(rows, 1, -1)
        return layer.o(out)


def _decode_layers(layers: list[nn.Module], ops: ModuleType | None, scaling: float) -> tuple[object | None, range]:
    """The C++ `DecodeLayers` over `layers` and the row counts it serves: those for which runtime/cpu/kernels.py chose
    `linear_rows` ("cpp") in every linear layer, since it runs every product with that kernel (one row: the
    one-row choice; 2..FEW_ROWS_MAX: the few-row choice). (None, empty) without the C++ ops or such a choice."""
    from distinfer.runtime.cpu.kernels import FEW_ROWS_MAX, CpuLinear

    if ops is None:
        return None, range(0)
    linears = [m for layer in layers for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                                                layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                                                layer.mlp.down_proj)]
    if not all(isinstance(m, CpuLinear) and m.ops is not None and m.weight.is_contiguous() for m in linears):
        return None, range(0)
    one = all(m.one_row == "cpp" for m in linears)
    few = all(m.few_rows == "cpp" for m in linears)
    rows = range(1 if one else 2, FEW_ROWS_MAX + 1 if few else 2) if one or few else range(0)
    if not rows:
        return None, rows
    norms = [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    stack = ops.DecodeLayers([n.weight for n in norms], [float(n.variance_epsilon) for n in norms],
                             [m.weight for m in linears], [m.bias for m in linears], float(scaling))
    return stack, rows


def decodes_llama(model: nn.Module) -> bool:
    """Whether `LlamaDecoder` can run this stage's layers: plain `transformers` Llama decoder layers with SDPA
    attention, RMSNorm and a rotary embedding that depends on the position only."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

    layers = getattr(getattr(model, "model", None), "layers", None)
    config = model.config
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if not layers or any(type(layer) is not LlamaDecoderLayer for layer in layers):
        return False
    if rope not in POSITION_ONLY_ROPE or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "pretraining_tp", 1) != 1 or getattr(model.model, "rotary_emb", None) is None:
        return False
    norms = [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    return all(type(n) is LlamaRMSNorm for n in norms)


def llama_decoder(model: nn.Module, compiled: bool = True) -> LlamaDecoder | None:
    """A LlamaDecoder for a stage that `decodes_llama`, else None. An fp32 stage on CPU gets the C++ ops where they
    build (`compiled`), else PyTorch operations."""
    if not decodes_llama(model):
        return None
    weight = model.model.layers[0].input_layernorm.weight
    ops = None
    if compiled and weight.dtype == torch.float32 and weight.device.type == "cpu":
        from distinfer.runtime.cpu.cpp_ops import decode_ops

        ops = decode_ops()
    return LlamaDecoder(model, ops)
