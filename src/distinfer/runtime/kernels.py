"""Faster fp32 linear layers for CPU ranks (the GPU path keeps cuBLAS through plain `nn.Linear`).

PyTorch runs an fp32 `nn.Linear` on CPU through MKL's sgemm, which is slow for the few rows of a
decode step: one token (a matrix-vector product) runs on one core whatever the thread count, and a
batch of 8 rows reaches about half of oneDNN's speed. Measured on the benchmark's 160 M Llama (2 cores,
`make bench`): the decode step's weight reads take 31 ms with MKL, 21 ms with oneDNN and 16 ms when the
weight's rows are split over the cores as one batched product (`bmm`, which PyTorch runs one matrix per
thread); at 8 rows, 59 ms with MKL and 30 ms with oneDNN.

`CpuLinear` keeps the layer's own parameters (same names, no copy) and picks per call: one row ->
row-split `bmm`, more rows -> oneDNN. Results differ from MKL's only by summation order (about 1e-6
relative); the token-exact tests compare the engines that use it with the stock reference.
"""

from __future__ import annotations

import torch
from torch import nn


def fast_cpu_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class CpuLinear(nn.Module):
    """`y = x W^T + b` with the kernel chosen by the number of rows; `weight` is [out, in] as in nn.Linear."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, splits: int) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape
        self.splits = splits if splits > 1 and self.out_features % splits == 0 else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 1 and self.splits > 1:
            parts = self.weight.view(self.splits, self.out_features // self.splits, self.in_features)
            out = torch.bmm(parts, rows.t().expand(self.splits, -1, -1)).view(1, self.out_features)
            if self.bias is not None:
                out = out + self.bias
        else:
            out = torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, splits={self.splits}"


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
