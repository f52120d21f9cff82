"""Faster fp32 linear layers for CPU ranks (the GPU path keeps cuBLAS through plain `nn.Linear`).

PyTorch runs an fp32 `nn.Linear` on CPU through MKL's sgemm, which is slow for the few rows of a
decode step: one token (a matrix-vector product) runs on one core whatever the thread count, and a
batch of 8 rows reaches about half of oneDNN's speed. Measured on the benchmark's 160 M Llama (2 cores,
`make bench`): the decode step's weight reads take 31 ms with MKL, 21 ms with oneDNN and 16 ms when the
weight's rows are split over the cores as one batched product (`bmm`, which PyTorch runs one matrix per
thread); at 8 rows, 59 ms with MKL and 30 ms with oneDNN.

`CpuLinear` keeps the layer's own parameters (same names, no copy) and picks per call: one row -> the
one-row kernel, more rows -> oneDNN. Results differ from MKL's only by summation order (about 1e-6
relative); the token-exact tests compare the engines that use it with the stock reference.

Which one-row kernel is fastest depends on the CPU: on the AMD EPYC above, MKL's matrix-vector product
uses one core and the row-split `bmm` wins; on an Intel Xeon (2 vCPUs, session 10) MKL uses both cores
and the split `bmm` takes twice as long (the 160 M model's linear layers, one row: MKL 23-26 ms, oneDNN
33 ms, split 51-58 ms). So `choose_one_row_kernel` times the three on the stage's own weights once, after
loading, and every layer then uses the fastest.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

ONE_ROW_KERNELS = ("split", "onednn", "mkl")  # row-split bmm, oneDNN, F.linear (MKL)


def fast_cpu_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class CpuLinear(nn.Module):
    """`y = x W^T + b` with the kernel chosen by the number of rows; `weight` is [out, in] as in nn.Linear."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, splits: int, one_row: str = "split") -> None:
        super().__init__()
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape
        self.splits = splits if splits > 1 and self.out_features % splits == 0 else 1
        self.one_row = one_row  # one of ONE_ROW_KERNELS ("split" without splits runs oneDNN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 1 and self.one_row == "split" and self.splits > 1:
            parts = self.weight.view(self.splits, self.out_features // self.splits, self.in_features)
            out = torch.bmm(parts, rows.t().expand(self.splits, -1, -1)).view(1, self.out_features)
            if self.bias is not None:
                out = out + self.bias
        elif rows.shape[0] == 1 and self.one_row == "mkl":
            out = F.linear(rows, self.weight, self.bias)
        else:
            out = torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, splits={self.splits}, "
                f"one_row={self.one_row}")


def _is_fp32_cpu_linear(module: nn.Module) -> bool:
    """An nn.Linear or GPT-2 Conv1D with a plain fp32 weight on the CPU (not e.g. a torchao int8 tensor)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or type(weight.detach()) is not torch.Tensor:
        return False
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        return False
    return type(module) is nn.Linear or (type(module).__name__ == "Conv1D" and weight.dim() == 2)


def _cpu_linear(module: nn.Module, splits: int) -> CpuLinear:
    weight = module.weight
    if type(module) is not nn.Linear:  # transformers.pytorch_utils.Conv1D stores the weight as [in, out]
        weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=False)
    return CpuLinear(weight, module.bias, splits)


def use_fast_cpu_linears(model: nn.Module, splits: int | None = None) -> int:
    """Replace every fp32 CPU linear layer of `model` by a CpuLinear whose one-row products are split in
    `splits` parts (default: this process's thread count); returns how many layers were replaced."""
    if not fast_cpu_linear_available():
        return 0
    splits = splits or torch.get_num_threads()
    targets = [(name, module) for name, module in model.named_modules() if _is_fp32_cpu_linear(module)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _cpu_linear(module, splits))
    return len(targets)


def choose_one_row_kernel(model: nn.Module, budget_bytes: int = 256 * 2**20, passes: int = 3) -> dict | None:
    """Time one-row products through `model`'s CpuLinear layers with each of ONE_ROW_KERNELS (interleaved, a
    warm-up pass first, the best of `passes`), then set the fastest on every layer. The layers timed hold up to
    `budget_bytes` of weights, more than a CPU's caches, so that the timing reads memory as a decode step
    does. Returns {"kernel": name, "read_bytes_per_s": {name: rate}}, or None without CpuLinear layers."""
    layers = [m for m in model.modules() if isinstance(m, CpuLinear)]
    if not layers:
        return None
    timed, total = [], 0
    for layer in layers:
        timed.append(layer)
        total += layer.weight.numel() * layer.weight.element_size()
        if total >= budget_bytes:
            break
    kernels = [k for k in ONE_ROW_KERNELS if k != "split" or any(m.splits > 1 for m in timed)]
    inputs = _one_row_inputs(timed)
    best = dict.fromkeys(kernels, float("inf"))
    for attempt in range(passes + 1):
        for kernel in kernels:
            for layer in timed:
                layer.one_row = kernel
            elapsed = _one_row_pass_s(timed, inputs)
            if attempt:
                best[kernel] = min(best[kernel], elapsed)
    chosen = min(best, key=best.__getitem__)
    for layer in layers:
        layer.one_row = chosen
    return {"kernel": chosen, "read_bytes_per_s": {k: total / t for k, t in best.items()}}


def one_row_products_s(model: nn.Module, passes: int = 3) -> float:
    """Best time of one pass of one-row products through every CpuLinear of `model`, each with the kernel it
    has (a warm-up pass first): what a batch-1 decode step takes if it does nothing but read its weights."""
    layers = [m for m in model.modules() if isinstance(m, CpuLinear)]
    inputs = _one_row_inputs(layers)
    _one_row_pass_s(layers, inputs)  # warm-up
    return min(_one_row_pass_s(layers, inputs) for _ in range(passes))


def _one_row_inputs(layers: list[CpuLinear]) -> dict[int, torch.Tensor]:
    return {m.in_features: torch.randn(1, m.in_features, dtype=m.weight.dtype) for m in layers}


def _one_row_pass_s(layers: list[CpuLinear], inputs: dict[int, torch.Tensor]) -> float:
    """Seconds for one row through each of `layers` in turn."""
    with torch.inference_mode():
        start = time.perf_counter()
        for layer in layers:
            layer(inputs[layer.in_features])
        return time.perf_counter() - start
