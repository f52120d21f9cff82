"""One small adapter per model family: where the layers, embedding and head live, and how a stage runs them.

The adapters apply pipeline stages to an ordinary `transformers` model (gpt-fast style): no copy of
the model code, only the few lines of each family's forward that surround the decoder layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask


def _get(root: nn.Module, dotted: str) -> nn.Module | None:
    module: nn.Module | None = root
    for part in dotted.split("."):
        module = getattr(module, part, None)
    return module


def _set(root: nn.Module, dotted: str, value: nn.Module | None) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(_get(root, parent) if parent else root, name, value)


@dataclass(frozen=True)
class Family:
    """Module names of one architecture family; subclasses add the forward pieces."""

    name: str
    layers: str  # the ModuleList of decoder layers
    first: tuple[str, ...]  # modules only stage 0 keeps
    last: tuple[str, ...]  # modules only the last stage keeps
    attention: str  # attribute of a decoder layer holding `layer_idx`

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        layers = _get(model, self.layers)
        assert isinstance(layers, nn.ModuleList)
        return layers

    def keep_stage(self, model: nn.Module, start: int, stop: int, is_first: bool, is_last: bool) -> None:
        """Delete every module this stage does not own and re-index its layers' KV-cache slots from 0."""
        kept = list(self.decoder_layers(model))[start:stop]
        _set(model, self.layers, nn.ModuleList(kept))
        for local_idx, layer in enumerate(kept):
            getattr(layer, self.attention).layer_idx = local_idx
        for dotted in () if is_first else self.first:
            _set(model, dotted, None)
        for dotted in () if is_last else self.last:
            _set(model, dotted, None)

    def rebuild_buffers(self, model: nn.Module, device: torch.device) -> None:
        """Recreate non-persistent buffers that stayed on the meta device (e.g. rotary frequencies)."""

    def embed(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def layer_inputs(self, model: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict:
        """Extra keyword arguments every decoder layer of this family takes."""
        return {"position_ids": position_ids}

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def layer_kwargs(
        self,
        model: nn.Module,
        shape: tuple[int, int],
        dtype: torch.dtype,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: object,
    ) -> dict:
        """What every decoder layer takes besides the hidden states, for a step of `shape` = (rows, positions):
        the causal mask as the model builds it, the cache, the family's extras (rotary embedding). Needs no
        hidden states, so a pipeline stage builds it while it waits for them."""
        like = torch.empty((*shape, model.config.hidden_size), dtype=dtype, device=position_ids.device)
        mask = create_causal_mask(
            config=model.config,
            inputs_embeds=like,
            attention_mask=attention_mask,
            past_key_values=cache,
            position_ids=position_ids,
        )
        extra = self.layer_inputs(model, like, position_ids)
        return {"attention_mask": mask, "past_key_values": cache, "use_cache": True, **extra}

    def run_layers(self, model: nn.Module, hidden: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
        """This stage's decoder layers on `hidden` (`layer_kwargs` from `layer_kwargs`)."""
        for layer in self.decoder_layers(model):
            hidden = layer(hidden, **layer_kwargs)
        return hidden


class LlamaFamily(Family):
    """Llama and its relatives (`model.layers`, RMSNorm, rotary embedding)."""

    def rebuild_buffers(self, model: nn.Module, device: torch.device) -> None:
        rotary = model.model.rotary_emb
        with torch.device(device):
            model.model.rotary_emb = type(rotary)(config=model.config)

    def embed(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return model.model.embed_tokens(input_ids)

    def layer_inputs(self, model: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict:
        return {"position_ids": position_ids, "position_embeddings": model.model.rotary_emb(hidden, position_ids)}

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.lm_head(model.model.norm(hidden))


class GPT2Family(Family):
    """GPT-2 and its relatives (`transformer.h`, learned position embedding, tied head)."""

    def embed(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        t = model.transformer
        return t.drop(t.wte(input_ids) + t.wpe(position_ids))

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.lm_head(model.transformer.ln_f(hidden))


LLAMA = LlamaFamily("llama", "model.layers", ("model.embed_tokens",), ("model.norm", "lm_head"), "self_attn")
GPT2 = GPT2Family("gpt2", "transformer.h", ("transformer.wte", "transformer.wpe"), ("transformer.ln_f", "lm_head"), "attn")


def family_of(model: nn.Module) -> Family:
    """The adapter for a loaded (or meta) causal LM, or a clear error naming what is supported."""
    for family in (LLAMA, GPT2):
        if isinstance(_get(model, family.layers), nn.ModuleList):
            return family
    raise ValueError(
        f"{type(model).__name__} is not a supported decoder-only layout; supported: Llama family "
        f"(model.layers) and GPT-2 family (transformer.h)"
    )
