"""The bench's model: a randomly initialised ~160 M-parameter Llama with tiny-llama's tokenizer, built once."""

from __future__ import annotations

from pathlib import Path

import torch

MODEL_CONFIG = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                    num_key_value_heads=16, max_position_embeddings=2048, tie_word_embeddings=False)


def build_model(cache: Path) -> Path:
    """A randomly initialised Llama (tiny-llama's tokenizer, larger layers), saved as safetensors once."""
    target = cache / "bench-llama-160m"
    if (target / "config.json").is_file():
        return target
    from transformers import LlamaConfig, LlamaForCausalLM

    from distinfer.models.tiny import train_tokenizer

    tokenizer = train_tokenizer(add_bos=True)
    config = LlamaConfig(vocab_size=len(tokenizer), initializer_range=0.02, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, **MODEL_CONFIG)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
