"""The work of one forward of one stage: FLOPs done and bytes read, from the model's sizes (memory.ModelFacts).

A forward of `rows` sequences with `new` positions each (the prompt at prefill, 1 in decode) over a context of
`context` positions: every linear layer's weights are read once and multiply every position (2 FLOPs per weight
and position); attention reads the KV cache and does 4 x heads x head_dim FLOPs per query and key position
(scores and weighted values; causal prefill: half the square); the last stage's head runs on the last position
only. A mixture-of-experts layer runs top-k of its experts per token: its FLOPs count k experts, its bytes the
experts that some token in the step chose (all of them once the step has more than a few tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from distinfer.layout import StageLayout
from distinfer.memory import DTYPE_BYTES, ModelFacts

OPS_PER_LAYER = 14  # launched operations of one eager decoder layer: norms, projections, rotary, attention, adds
FUSED_OPS_PER_LAYER = 4  # a Llama layer's decode step on CPU pipeline stages: four C++ calls (runtime/cpu/)


@dataclass(frozen=True)
class Work:
    flops: float
    bytes: float
    layers: int
    prefill: bool = False  # a forward of whole prompts (its products run at the prefill efficiency)


def forward_work(facts: ModelFacts, stage: StageLayout, rows: int, new: int, context: float, dtype: str,
                 quantization: str | None = None, tp: int = 1, ep: int = 1, top_k: int = 2) -> Work:
    """FLOPs and bytes of one forward of this stage on one rank of its tp (or ep) group."""
    size = DTYPE_BYTES[dtype]
    weight_size = 1 if quantization == "int8" else size
    layers = stage.stop - stage.start
    tokens = rows * new
    dense = facts.shared_layer_parameters() - 4 * facts.hidden  # the matrices (norms are vectors)
    expert = 3 * facts.hidden * facts.intermediate  # one expert's gate, up and down
    if facts.experts:
        used = min(facts.experts, tokens * top_k)  # experts some token of the step goes to
        flops_params = dense / tp + top_k * expert / ep  # each rank computes 1/ep of the (token, expert) pairs
        read_params = dense / tp + used * expert / ep
    else:
        flops_params = read_params = dense / tp
    attention_dim = facts.heads * facts.head_dim / tp
    kv_dim = max(1, facts.kv_heads // tp) * facts.head_dim
    mean_keys = context - new / 2 if new > 1 else context  # causal prefill: each query sees the keys before it
    flops = layers * (2 * flops_params * tokens + 4 * attention_dim * tokens * mean_keys)
    nbytes = layers * (read_params * weight_size + 2 * rows * context * kv_dim * size)
    if stage.is_last:
        flops += 2 * facts.vocab * facts.hidden * rows
        nbytes += facts.vocab * facts.hidden * weight_size
    return Work(flops, nbytes, layers, new > 1)
