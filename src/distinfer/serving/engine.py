"""Continuous batching on one device: requests join the running decode at the next step and leave when done.

Each new request is prefilled alone (its prompt, its own KV cache), samples its first token, and then joins
the batch: the batch's KV cache and attention mask are left-padded to a common length, as `generate` pads a
batch, and every decode step runs all running requests in one forward with their own positions. A request
that ends (EOS unless `ignore_eos`, its `max_tokens`, or a cancelled client) leaves at once; the others go
on. Padding is masked, so a request's greedy tokens are those of `generate` on its prompt alone (the tests
check it in fp32 with requests arriving while others decode).

One thread (`run_forever`) owns the model; `submit` and `cancel` may be called from any thread, and tokens
are handed to each request's `emit` callback from the engine thread.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from distinfer.runtime.sampling import SamplingParams, filter_logits

Emit = Callable[[int | None, str | None], None]  # (token id or None, finish reason or None)


@dataclass
class Sequence:
    """One request in the engine."""

    request_id: int
    prompt_ids: list[int]
    max_tokens: int
    emit: Emit
    ignore_eos: bool = False
    sampling: SamplingParams = field(default_factory=SamplingParams)
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)
    generator: torch.Generator | None = None  # a sampled request's own random stream


@dataclass
class EngineStats:
    """What /metrics reports."""

    requests_total: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    generated_tokens_total: int = 0
    prompt_tokens_total: int = 0
    steps_total: int = 0
    running: int = 0
    waiting: int = 0


def _pad_left(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """`tensor` left-padded with zeros along `dim` to `length`."""
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim) + [missing, 0]
    return F.pad(tensor, pad)


class BatchingEngine:
    """Continuous batching over a whole model (a one-rank layout: the reference or a one-stage pipeline)."""

    def __init__(self, model: nn.Module, device: torch.device, eos_token_ids: tuple[int, ...], max_batch: int = 32,
                 max_positions: int | None = None) -> None:
        self.model, self.device, self.eos = model, device, set(eos_token_ids)
        self.max_batch, self.max_positions = max_batch, max_positions
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._waiting: list[Sequence] = []
        self._running: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, cached positions]: 0 for padding
        self._last: torch.Tensor | None = None  # [rows]: each row's last token
        self._wake = threading.Condition()
        self._stopped = False

    # -- called from any thread -------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], max_tokens: int, emit: Emit, ignore_eos: bool = False,
               sampling: SamplingParams | None = None) -> int:
        """Queue a request; its tokens go to `emit(token, None)`, and its end to `emit(None, reason)`."""
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        if self.max_positions is not None and len(prompt_ids) + max_tokens > self.max_positions:
            raise ValueError(f"{len(prompt_ids)} prompt tokens + max_tokens {max_tokens} exceed the model's "
                             f"{self.max_positions} positions")
        sequence = Sequence(next(self._ids), list(prompt_ids), max_tokens, emit, ignore_eos,
                            sampling or SamplingParams())
        with self._wake:
            self._waiting.append(sequence)
            self.stats.requests_total += 1
            self.stats.prompt_tokens_total += len(prompt_ids)
            self.stats.waiting = len(self._waiting)
            self._wake.notify()
        return sequence.request_id

    def cancel(self, request_id: int) -> None:
        """Free a request's slot at the next step (its client went away)."""
        with self._wake:
            for sequence in self._waiting + self._running:
                if sequence.request_id == request_id:
                    sequence.cancelled = True
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()

    # -- the engine thread ------------------------------------------------------------------------------
    def run_forever(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stopped and not self._waiting and not self._running:
                        self._wake.wait()
                    if self._stopped:
                        return
                    free = self.max_batch - len(self._running)
                    joining, self._waiting = self._waiting[:free], self._waiting[free:]
                    self.stats.waiting = len(self._waiting)
                self.step(joining)

    def step(self, joining: list[Sequence]) -> None:
        """Prefill the joining requests (one by one) into the batch, then one decode step for every request."""
        for sequence in joining:
            if sequence.cancelled:
                self._finish(sequence, "cancelled")
                continue
            self._prefill(sequence)
        if self._running:
            self._decode()
        self.stats.steps_total += 1
        self.stats.running = len(self._running)

    def _sample(self, logits: torch.Tensor, rows: list[Sequence]) -> list[int]:
        """Greedy rows in one argmax; sampled rows from their own seeded stream (filters as runtime/sampling.py)."""
        picks = torch.argmax(logits, dim=-1).tolist()
        for row, sequence in enumerate(rows):
            if not sequence.sampling.greedy:
                if sequence.generator is None:
                    sequence.generator = torch.Generator(device=logits.device).manual_seed(sequence.sampling.seed)
                probs = filter_logits(logits[row : row + 1], sequence.sampling).softmax(dim=-1)
                picks[row] = int(torch.multinomial(probs[0], 1, generator=sequence.generator))
        return picks

    def _prefill(self, sequence: Sequence) -> None:
        ids = torch.tensor([sequence.prompt_ids], device=self.device)
        cache = DynamicCache(config=self.model.config)
        positions = torch.arange(ids.shape[1], device=self.device)[None]
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions,
                         past_key_values=cache, use_cache=True)
        token = self._sample(out.logits[:, -1, :].float(), [sequence])[0]
        self._join(sequence, cache, ids.shape[1], token)
        self._after_token(sequence, token, len(self._running) - 1)

    def _join(self, sequence: Sequence, cache: DynamicCache, length: int, token: int) -> None:
        """Add a prefilled request as a row of the batch: left-pad the shorter of the two to a common length."""
        row_mask = torch.ones(1, length, dtype=torch.long, device=self.device)
        if self._cache is None or not self._running:
            self._cache, self._mask = cache, row_mask
            self._last = torch.tensor([token], device=self.device)
            self._running = [sequence]
            return
        common = max(self._mask.shape[1], length)
        layers = []
        for old, new in zip(self._cache.layers, cache.layers):
            keys = torch.cat([_pad_left(old.keys, common, 2), _pad_left(new.keys, common, 2)])
            values = torch.cat([_pad_left(old.values, common, 2), _pad_left(new.values, common, 2)])
            layers.append((keys, values))
        self._cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)
        self._mask = torch.cat([_pad_left(self._mask, common, 1), _pad_left(row_mask, common, 1)])
        self._last = torch.cat([self._last, torch.tensor([token], device=self.device)])
        self._running.append(sequence)

    def _decode(self) -> None:
        rows = len(self._running)
        mask = torch.cat([self._mask, torch.ones(rows, 1, dtype=self._mask.dtype, device=self.device)], dim=1)
        positions = (self._mask.sum(dim=1, keepdim=True))  # each row's real tokens so far: the new one's position
        out = self.model(input_ids=self._last[:, None], attention_mask=mask, position_ids=positions,
                         past_key_values=self._cache, use_cache=True)
        self._mask = mask
        tokens = self._sample(out.logits[:, -1, :].float(), self._running)
        self._last = torch.tensor(tokens, device=self.device)
        keep = [row for row, (sequence, token) in enumerate(zip(list(self._running), tokens))
                if self._after_token(sequence, token, row)]
        if len(keep) < rows:
            self._leave(keep)

    def _after_token(self, sequence: Sequence, token: int, row: int) -> bool:
        """Hand the token out; True while the request goes on."""
        if sequence.cancelled:
            self._finish(sequence, "cancelled")
            return False
        sequence.generated.append(token)
        self.stats.generated_tokens_total += 1
        sequence.emit(token, None)
        if token in self.eos and not sequence.ignore_eos:
            self._finish(sequence, "stop")
            return False
        if len(sequence.generated) >= sequence.max_tokens:
            self._finish(sequence, "length")
            return False
        return True

    def _leave(self, keep: list[int]) -> None:
        """Drop finished rows; trim the padding columns that every remaining row has."""
        if not keep:
            self._running, self._cache, self._mask, self._last = [], None, None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._running = [self._running[row] for row in keep]
        self._mask, self._last = self._mask[index], self._last[index]
        pad = int((self._mask.cumsum(dim=1) == 0).sum(dim=1).min())
        layers = [(layer.keys[index, :, pad:], layer.values[index, :, pad:]) for layer in self._cache.layers]
        self._cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)
        self._mask = self._mask[:, pad:]

    def _finish(self, sequence: Sequence, reason: str) -> None:
        if reason == "cancelled":
            self.stats.requests_cancelled += 1
        else:
            self.stats.requests_finished += 1
        sequence.emit(None, reason)
