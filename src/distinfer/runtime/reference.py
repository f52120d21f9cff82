"""Single-device reference: the whole model and `transformers` generate, timed per step."""

from __future__ import annotations

import time

import torch
from torch import nn

from distinfer.runtime.pipeline import Batch, BatchOutput, StopRule, truncate_at_eos
from distinfer.runtime.sampling import Sampler


class _StepClock:
    """A logits processor that only notes when each step's logits are ready (the token's arrival)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


class _SampledBy:
    """A logits processor that draws each row's token with distinfer's sampler (per-prompt seeded generators,
    the same on every engine) and leaves only that token possible, so that greedy `generate` picks it."""

    def __init__(self, sampler: Sampler, prompt_indices: list[int]) -> None:
        self.sampler, self.prompt_indices = sampler, prompt_indices

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        picks = self.sampler(scores, self.prompt_indices)
        only = torch.full_like(scores, float("-inf"))
        return only.scatter_(1, picks[:, None], 0.0)


class ReferenceEngine:
    """HF `generate` on one device: the baseline a user would otherwise pick, and the correctness oracle.
    Sampled runs draw with the same `Sampler` as the pipeline, so a seed gives the same draws on every engine."""

    def __init__(self, model: nn.Module, device: torch.device, sampler: Sampler, stop: StopRule) -> None:
        self.model, self.device, self.sampler, self.stop = model, device, sampler, stop
        self.steps: list[dict] = []

    def generate(self, batch: Batch) -> BatchOutput:
        from transformers import LogitsProcessorList

        clock = _StepClock()
        processors = [clock] if self.sampler.params.greedy else [_SampledBy(self.sampler, batch.prompt_indices), clock]
        start = time.perf_counter()
        out = hf_generate(self.model, batch, self.stop, self.device, logits_processor=LogitsProcessorList(processors))
        end = time.perf_counter()
        generated = out.tolist()
        times = [t - start for t in clock.times]
        self.steps.append({"batch": batch.index, "mb": 0, "step": len(times),
                           "tokens": int(out.numel() + batch.input_ids.numel()),
                           "compute_s": end - start, "send_s": 0.0, "wait_s": 0.0})
        tokens, token_times = [], []
        for ids in generated:
            row_tokens, row_times = truncate_at_eos(ids, times, self.stop.eos_token_ids)
            tokens.append(row_tokens)
            token_times.append(row_times)
        return BatchOutput(tokens=tokens, token_times=token_times, start=start)


def hf_generate(model: nn.Module, batch: Batch, stop: StopRule, device: torch.device, **kwargs) -> torch.Tensor:  # noqa: ANN003,E501
    """`model.generate` on the batch with the run's stop rule (greedy unless `kwargs` say otherwise); returns the
    new tokens, [rows, steps], padded after a row's EOS."""
    kwargs.setdefault("do_sample", False)
    with torch.inference_mode():
        out = model.generate(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            max_new_tokens=stop.max_new_tokens,
            eos_token_id=list(stop.eos_token_ids),
            pad_token_id=stop.pad_token_id,
            **kwargs,
        )
    return out[:, batch.input_ids.shape[1]:]
