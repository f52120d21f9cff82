"""Accuracy beside the completions: perplexity of a fixed text under the whole model."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from distinfer.models.profiles import max_positions


def perplexity(model: nn.Module, tokenizer, text_file: Path, max_tokens: int, device: torch.device) -> dict:  # noqa: ANN001
    """exp(mean next-token negative log-likelihood) over the first `max_tokens` tokens of the text, one forward."""
    limit = min(max_tokens, max_positions(model.config.to_dict()) or max_tokens)
    ids = tokenizer(text_file.read_text(), return_tensors="pt")["input_ids"][:, :limit].to(device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return {"perplexity": math.exp(float(nll)), "perplexity_tokens": int(ids.shape[1])}
