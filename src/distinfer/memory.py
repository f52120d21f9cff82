"""Per-rank memory estimate of a run, from config.json facts alone (no torch): does it fit the device?

weights: the stage's decoder layers (+ embedding on the first stage, + norm and head on the last) at
the dtype; KV cache: 2 x layers x batch x (prompt + new tokens) x kv_heads x head_dim x bytes;
activations: the prefill's largest transient tensors (MLP input/output and the logits of one
position); overhead: CUDA context and allocator slack (a fixed allowance).

The KV cache grows by one position a step, and PyTorch's default allocator keeps blocks of every old size
cached: the job scripts set `expandable_segments` (GPU_ALLOCATOR) so that what is reserved stays close to this
estimate. How the estimate compared with a GPU's peak: docs/performance.md, "On a GPU".
"""

from __future__ import annotations

from dataclasses import dataclass

from distinfer.layout import StageLayout

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
GPU_OVERHEAD_BYTES = 768 * 1024**2  # CUDA's context + the allocator's slack (docs/performance.md: "On a GPU")
GPU_ALLOCATOR = "expandable_segments:True"  # PYTORCH_CUDA_ALLOC_CONF of GPU ranks (module docstring)
CPU_OVERHEAD_BYTES = 400 * 1024**2  # Python, torch and transformers in a process


@dataclass(frozen=True)
class ModelFacts:
    """Sizes read from a model's config.json."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    gated_mlp: bool  # Llama's gate/up/down (3 matrices) vs GPT-2's 2
    experts: int = 0  # a mixture-of-experts model's experts per layer (0: dense); each a gated MLP

    @classmethod
    def from_config(cls, cfg: dict) -> ModelFacts:
        hidden = int(cfg.get("hidden_size", cfg.get("n_embd", 0)))
        heads = int(cfg.get("num_attention_heads", cfg.get("n_head", 1)))
        gpt2 = "n_embd" in cfg or cfg.get("model_type") == "gpt2"
        return cls(
            layers=int(cfg.get("num_hidden_layers", cfg.get("n_layer", 0))),
            hidden=hidden,
            intermediate=int(cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * hidden),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            vocab=int(cfg["vocab_size"]),
            tied=bool(cfg.get("tie_word_embeddings", gpt2)),
            gated_mlp=not gpt2,
            experts=int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_parameters(self) -> int:
        return self.shared_layer_parameters() + self.expert_layer_parameters()

    def shared_layer_parameters(self) -> int:
        """A layer's parameters outside its experts: attention, norms, a dense MLP or an MoE router."""
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * self.head_dim
        dense = (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        mlp = self.experts * self.hidden if self.experts else dense  # an MoE layer's router, else its MLP
        return attn + mlp + 4 * self.hidden

    def expert_layer_parameters(self) -> int:
        """A layer's experts (gate, up and down of each)."""
        return self.experts * 3 * self.hidden * self.intermediate

    def embedding_parameters(self) -> int:
        return self.vocab * self.hidden

    def total_parameters(self) -> int:
        head = 0 if self.tied else self.embedding_parameters()
        return self.layers * self.layer_parameters() + self.embedding_parameters() + head + self.hidden


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    activations: int
    overhead: int
    capacity: int
    layers: tuple[int, int] = (0, 0)  # the stage's decoder layers, [start, stop)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


def estimate_stage_memory(
    facts: ModelFacts,
    stage: StageLayout,
    dtype: str,
    batch: int,
    context_tokens: int,
    capacity: int,
    gpu: bool,
    quantization: str | None = None,
    tp: int = 1,
    ep: int = 1,
) -> MemoryEstimate:
    """Bytes one rank needs for its stage at this batch size and context (prompt + new tokens).
    int8 weight-only: the linear layers' weights take one byte each (plus a scale per output channel).
    Tensor parallel over `tp` ranks: each holds 1/tp of the decoder layers' weights, of the KV cache (heads are
    split) and of the MLP's activations; the embedding and the head are counted whole (not every engine
    shards them). Expert parallel over `ep` ranks: each holds its stage's attention and routers whole and
    1/ep of each layer's experts."""
    size = DTYPE_BYTES[dtype]
    weight_size = 1 if quantization == "int8" else size
    layers = stage.stop - stage.start
    shared = facts.shared_layer_parameters() if ep > 1 else facts.layer_parameters()  # ep: attention whole
    experts = facts.expert_layer_parameters() // ep if ep > 1 else 0  # and 1/ep of the experts on each rank
    weights = -(-layers * (shared + experts) * weight_size // tp)
    if stage.is_first:
        weights += facts.embedding_parameters() * size
    if stage.is_last:
        weights += facts.hidden * size
        weights += (facts.embedding_parameters() * weight_size if not facts.tied or not stage.is_first else 0)
    kv = 2 * layers * batch * context_tokens * -(-facts.kv_heads // tp) * facts.head_dim * size
    activations = (batch * context_tokens * (2 * facts.hidden + -(-facts.intermediate // tp)) * size
                   + batch * facts.vocab * 4)
    overhead = GPU_OVERHEAD_BYTES if gpu else CPU_OVERHEAD_BYTES
    return MemoryEstimate(weights, kv, activations, overhead, capacity, (stage.start, stage.stop))
