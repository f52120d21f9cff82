"""The decode speed limit: how fast this machine copies memory, and how many weight bytes a decode step reads."""

from __future__ import annotations

import time

import torch
from torch import nn


class CopyBandwidth:
    """Bytes moved per second (read + write) by the best of several copies of one large tensor. The buffers are
    allocated once, so that measuring again between batches (bench/paired.py) costs only the copies."""

    def __init__(self, megabytes: int = 512) -> None:
        self.src = torch.ones(megabytes * 2**20 // 4)
        self.dst = torch.empty_like(self.src)

    def measure(self, repeats: int = 5) -> float:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            self.dst.copy_(self.src)
            best = min(best, time.perf_counter() - start)
        return 2 * self.src.numel() * self.src.element_size() / best


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """One measurement of `CopyBandwidth` (buffers freed afterwards)."""
    return CopyBandwidth(megabytes).measure(repeats)


class StockRowRead:
    """Weight bytes per second read by PyTorch's stock one-row product (`F.linear`: MKL on x86) at the current
    thread count, over more matrices of the bench model's MLP shape than the caches hold: what HF generate's
    batch-1 decode runs on. `make bench` measures it with every repeat, so that a repeat in which it falls is
    seen (on a shared VM, for 15 minutes once, every MKL path ran at 2/3 of its speed, while distinfer's own kernel did
    not, which inflated one stage / HF). The matrices are allocated once for every `measure`."""

    def __init__(self, megabytes: int = 640) -> None:
        shape = (2816, 1024)
        self.weights = [torch.ones(shape) for _ in range(max(1, megabytes * 2**20 // (shape[0] * shape[1] * 4)))]
        self.row = torch.ones(1, shape[1])

    def measure(self, repeats: int = 3) -> float:
        best = float("inf")
        for _ in range(repeats + 1):  # the first pass warms the kernel up
            start = time.perf_counter()
            for weight in self.weights:
                torch.nn.functional.linear(self.row, weight)
            best = min(best, time.perf_counter() - start)
        return sum(w.numel() * w.element_size() for w in self.weights) / best


def decode_read_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter but the input embedding table, of which a step
    reads one row per sequence (unless the output head shares it, and then the head reads it whole)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if embedding is None or (head is not None and head.weight.data_ptr() == embedding.weight.data_ptr()):
        return total
    return total - embedding.weight.numel() * embedding.weight.element_size()
