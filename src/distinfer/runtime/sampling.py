"""Token selection, identical on every engine: greedy, or seeded temperature / top-k / top-p sampling.

Each prompt has its own random generator, seeded from the experiment seed and the prompt's index,
so a sampled completion does not depend on batch size, micro-batches or the number of stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a seed is a signed 64-bit integer, as in vLLM's API


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from any integer: torch takes 64 bits, so the seed is taken modulo 2^64."""
    return torch.Generator(device=device).manual_seed(seed % 2**64)


@dataclass(frozen=True)
class SamplingParams:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the order `transformers` uses); masked entries are -inf."""
    logits = logits.float() / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - params.top_p)
        remove_sorted[..., -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


class Sampler:
    """Chooses the next token of each row; rows are named by their prompt's global index."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu") -> None:
        self.params = params
        self.device = torch.device(device)
        self._generators: dict[int, torch.Generator] = {}

    def _generator(self, prompt_index: int) -> torch.Generator:
        gen = self._generators.get(prompt_index)
        if gen is None:
            gen = seeded_generator(self.params.seed * 1_000_003 + prompt_index, self.device)
            self._generators[prompt_index] = gen
        return gen

    def reset(self) -> None:
        """Start every prompt's random stream again (e.g. for a repeat of the same prompts)."""
        self._generators.clear()

    def __call__(self, logits: torch.Tensor, prompt_indices: list[int]) -> torch.Tensor:
        """logits: [rows, vocab] of the last position -> token ids [rows]."""
        if self.params.greedy:
            return torch.argmax(logits, dim=-1)
        probs = filter_logits(logits, self.params).softmax(dim=-1)
        picks = [torch.multinomial(probs[i], 1, generator=self._generator(p)) for i, p in enumerate(prompt_indices)]
        return torch.cat(picks)
