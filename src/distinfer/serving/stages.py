"""One pipeline stage's share of continuous batching: a KV cache per micro-batch group over the stage's layers.

A group's rows are requests decoding together. Every stage holds the same rows in the same order, because
every stage applies the same steps (from `Step`, made by the scheduler on stage 0): drop the rows that ended,
one decode forward for the rows left, then one prefill forward for the joining requests, which become new
rows. A prefill runs the joining prompts on a cache of their own, left-padded to the longest as `generate`
pads a batch; joining left-pads the shorter of the group's cache and the new one to a common length, and the
padding is masked, so a request's greedy tokens are those of `generate` on its prompt alone whatever else
the group holds. The first stage embeds the
token ids; the last applies the head and samples (greedy rows in one argmax, sampled rows from their own
seeded stream); the layers in between come from the model family's adapter (models/families.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from distinfer.models.families import Family
from distinfer.runtime.sampling import SamplingParams, filter_logits, seeded_generator


@dataclass(frozen=True)
class Prefill:
    """A request joining a group: its prompt and, for the last stage, how it samples."""

    request_id: int
    prompt_ids: list[int]
    sampling: SamplingParams


@dataclass(frozen=True)
class Step:
    """One step of one group, the same on every stage. `keep`: the rows that stay (None: all), applied first;
    then one decode forward for them (`decode`, with `tokens` on stage 0), then the prefills in order."""

    group: int
    keep: list[int] | None = None
    decode: bool = False
    tokens: list[int] = field(default_factory=list)
    prefills: list[Prefill] = field(default_factory=list)

    @property
    def results(self) -> int:
        """Tokens the last stage samples: one per decoding row, one per prefill."""
        return (len(self.tokens) if self.decode else 0) + len(self.prefills)


def pad_left(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """`tensor` left-padded with zeros along `dim` to `length`."""
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim) + [missing, 0]
    return F.pad(tensor, pad)


@dataclass
class _Group:
    cache: DynamicCache | None = None
    mask: torch.Tensor | None = None  # [rows, cached positions]: 0 for padding
    sampling: list[tuple[SamplingParams, torch.Generator | None]] = field(default_factory=list)  # last stage

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])


class StageState:
    """This stage's groups and its part of the model (`model` as `load_stage_model` returns it)."""

    def __init__(self, model: nn.Module, family: Family, device: torch.device, is_first: bool, is_last: bool,
                 groups: int) -> None:
        self.model, self.family, self.device = model, family, device
        self.is_first, self.is_last = is_first, is_last
        self.dtype = next(model.parameters()).dtype
        self.hidden_size = int(model.config.hidden_size)
        self.groups = [_Group() for _ in range(groups)]

    def rows(self, group: int) -> int:
        return self.groups[group].rows

    def keep(self, group: int, rows: list[int] | None) -> None:
        """Drop the rows not in `rows`; trim the padding columns that every remaining row has."""
        g = self.groups[group]
        if rows is None or g.mask is None:
            return
        g.sampling = [g.sampling[row] for row in rows] if self.is_last else g.sampling
        if not rows:
            g.cache, g.mask = None, None
            return
        index = torch.tensor(rows, device=self.device)
        mask = g.mask[index]
        pad = int((mask.cumsum(dim=1) == 0).sum(dim=1).min())
        layers = [(layer.keys[index, :, pad:], layer.values[index, :, pad:]) for layer in g.cache.layers]
        g.cache, g.mask = DynamicCache(ddp_cache_data=layers), mask[:, pad:]

    def decode(self, group: int, inputs: torch.Tensor) -> torch.Tensor:
        """One position for every row: `inputs` are the token ids [rows] on the first stage, else the previous
        stage's hidden states [rows, 1, hidden]. Returns the hidden states, or on the last stage the logits."""
        g = self.groups[group]
        rows = g.rows
        mask = torch.cat([g.mask, torch.ones(rows, 1, dtype=g.mask.dtype, device=self.device)], dim=1)
        positions = g.mask.sum(dim=1, keepdim=True)  # each row's real tokens so far: the new one's position
        out = self._forward(inputs[:, None] if self.is_first else inputs, mask, positions, g.cache)
        g.mask = mask
        return out

    def prefill(self, group: int, inputs: torch.Tensor | list[list[int]], lengths: list[int],
                sampling: list[SamplingParams]) -> torch.Tensor:
        """The joining requests' prompts in one forward, left-padded to the longest as `generate` pads a batch
        (`inputs`: their token ids on the first stage, else the previous stage's hidden [rows, longest, hidden]);
        their cache then joins the group as new last rows. Returns the hidden states or the logits."""
        longest = max(lengths)
        mask = torch.tensor([[0] * (longest - n) + [1] * n for n in lengths], device=self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        if self.is_first:
            inputs = torch.tensor([[0] * (longest - len(ids)) + list(ids) for ids in inputs], device=self.device)
        cache = DynamicCache()
        out = self._forward(inputs, mask, positions, cache)
        self._join(self.groups[group], cache, mask, sampling)
        return out

    def sample(self, group: int, logits: torch.Tensor, rows: range) -> list[int]:
        """The next token of the group's `rows` from their logits [len(rows), vocab] (last stage)."""
        g = self.groups[group]
        picks = torch.argmax(logits, dim=-1).tolist()
        for i, row in enumerate(rows):
            params, generator = g.sampling[row]
            if params.greedy:
                continue
            if generator is None:
                generator = seeded_generator(params.seed, logits.device)
                g.sampling[row] = (params, generator)
            probs = filter_logits(logits[i : i + 1], params).softmax(dim=-1)
            picks[i] = int(torch.multinomial(probs[0], 1, generator=generator))
        return picks

    def _forward(self, inputs: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: DynamicCache) -> torch.Tensor:
        hidden = self.family.embed(self.model, inputs, positions) if self.is_first else inputs
        kwargs = self.family.layer_kwargs(self.model, tuple(hidden.shape[:2]), self.dtype, mask, positions, cache)
        hidden = self.family.run_layers(self.model, hidden, kwargs)
        if not self.is_last:
            return hidden
        return self.family.head(self.model, hidden[:, -1:, :])[:, -1, :].float()

    def _join(self, g: _Group, cache: DynamicCache, mask: torch.Tensor, sampling: list[SamplingParams]) -> None:
        if self.is_last:
            g.sampling += [(params, None) for params in sampling]
        if g.mask is None:
            g.cache, g.mask = cache, mask
            return
        common = max(g.mask.shape[1], mask.shape[1])
        layers = []
        for old, new in zip(g.cache.layers, cache.layers):
            keys = torch.cat([pad_left(old.keys, common, 2), pad_left(new.keys, common, 2)])
            values = torch.cat([pad_left(old.values, common, 2), pad_left(new.values, common, 2)])
            layers.append((keys, values))
        g.cache = DynamicCache(ddp_cache_data=layers)
        g.mask = torch.cat([pad_left(g.mask, common, 1), pad_left(mask, common, 1)])
