"""Faster fp32 linear layers for CPU ranks (the GPU path keeps cuBLAS through plain `nn.Linear`).

PyTorch runs an fp32 `nn.Linear` on CPU through MKL's sgemm, which can be slow for the few rows of a
decode step (on some CPUs a matrix-vector product runs on one core whatever the thread count). The
figures that shaped this module: docs/performance.md, "Why the CPU code is shaped as it is".

`CpuLinear` keeps the layer's own parameters (same names, no copy) and picks per call: one row -> the
one-row kernel, 2 to FEW_ROWS_MAX rows -> the few-row kernel, more rows -> oneDNN. Results differ from
MKL's only by summation order (about 1e-6 relative); the token-exact tests compare the engines that use it
with the stock reference.

Which kernel is fastest depends on the CPU (where MKL's matrix-vector product uses one core the row-split
`bmm` wins; where it uses every core the split loses), and distinfer's own `linear_rows` (csrc/linear_rows.cpp:
four weight rows against up to six input rows per register tile, weights prefetched ahead) reads the weights
once for a few rows. So `choose_kernels` times the candidates on the stage's own weights once, after loading,
at one row and at eight, and every layer then uses the fastest of each.
"""

from __future__ import annotations

import time
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

ONE_ROW_KERNELS = ("split", "onednn", "mkl", "cpp")  # row-split bmm, oneDNN, F.linear (MKL), linear_rows
FEW_ROWS_KERNELS = ("onednn", "cpp")  # for 2..FEW_ROWS_MAX rows; more rows always go to oneDNN
FEW_ROWS_MAX = 24  # past this many rows oneDNN's blocked product wins (docs/performance.md)
FEW_ROWS_TIMED = 8  # the rows the few-row kernels are timed at: a batch-8 decode step


def fast_cpu_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class CpuLinear(nn.Module):
    """`y = x W^T + b` with the kernel chosen by the number of rows; `weight` is [out, in] as in nn.Linear.
    `ops` (runtime/cpu/cpp_ops.py's `decode_ops`) provides the "cpp" kernel, `linear_rows`; without it "cpp" runs
    oneDNN."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, splits: int, one_row: str = "split",
                 few_rows: str = "onednn", ops: ModuleType | None = None) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape
        self.splits = splits if splits > 1 and self.out_features % splits == 0 else 1
        self.one_row = one_row  # one of ONE_ROW_KERNELS ("split" without splits runs oneDNN)
        self.few_rows = few_rows  # one of FEW_ROWS_KERNELS
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        count = rows.shape[0]
        kernel = self.one_row if count == 1 else self.few_rows if count <= FEW_ROWS_MAX else "onednn"
        if kernel == "cpp" and self.ops is not None:
            out = self.ops.linear_rows(rows.contiguous(), self.weight, self.bias)
        elif kernel == "split" and self.splits > 1:
            parts = self.weight.view(self.splits, self.out_features // self.splits, self.in_features)
            out = torch.bmm(parts, rows.t().expand(self.splits, -1, -1)).view(1, self.out_features)
            if self.bias is not None:
                out = out + self.bias
        elif kernel == "mkl":
            out = F.linear(rows, self.weight, self.bias)
        else:
            out = torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, splits={self.splits}, "
                f"one_row={self.one_row}, few_rows={self.few_rows}")


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


def choose_kernels(model: nn.Module, ops: ModuleType | None = None, budget_bytes: int = 256 * 2**20,
                   passes: int = 3, cpp_margin: float = 1.0) -> dict | None:
    """Time products through `model`'s CpuLinear layers with each one-row kernel (ONE_ROW_KERNELS) at one row
    and each few-row kernel (FEW_ROWS_KERNELS) at FEW_ROWS_TIMED rows, interleaved, a warm-up pass first, the
    best of `passes`; then set the fastest of each on every layer. "cpp" takes part where `ops`
    (runtime/cpu/cpp_ops.py's `decode_ops`) is given. The layers timed hold up to `budget_bytes` of weights, more
    than a CPU's caches, so that the timing reads memory as a decode step does. "cpp" is chosen while it takes
    at most `cpp_margin` times the fastest kernel's time (a Llama stage then runs whole decode steps in one C++
    call, runtime/cpu/llama_decode.py's ONE_CALL_MARGIN). Returns {"one_row": choice,
    "few_rows": choice}, each {"kernel": name, "read_bytes_per_s": {name: rate}}, or None without CpuLinear
    layers."""
    layers = [m for m in model.modules() if isinstance(m, CpuLinear)]
    if not layers:
        return None
    timed, total = [], 0
    for layer in layers:
        layer.ops = ops
        if total < budget_bytes:
            timed.append(layer)
            total += layer.weight.numel() * layer.weight.element_size()
    split = any(m.splits > 1 for m in timed)
    usable = {kind: [k for k in kernels if (k != "split" or split) and (k != "cpp" or ops is not None)]
              for kind, kernels in (("one_row", ONE_ROW_KERNELS), ("few_rows", FEW_ROWS_KERNELS))}
    choices = {kind: _time_kernels(timed, kind, usable[kind], 1 if kind == "one_row" else FEW_ROWS_TIMED, passes,
                                   cpp_margin) for kind in usable}
    for layer in layers:
        for kind, (kernel, _) in choices.items():
            setattr(layer, kind, kernel)
    return {kind: {"kernel": kernel, "read_bytes_per_s": {k: total / t for k, t in best.items()}}
            for kind, (kernel, best) in choices.items()}


def _time_kernels(layers: list[CpuLinear], kind: str, kernels: list[str], rows: int, passes: int,
                  cpp_margin: float) -> tuple[str, dict[str, float]]:
    """The fastest of `kernels` as `kind` ("one_row" or "few_rows") on `rows` rows ("cpp" within `cpp_margin` of
    it), and each one's best time."""
    inputs = _inputs(layers, rows)
    best = dict.fromkeys(kernels, float("inf"))
    for attempt in range(passes + 1):
        for kernel in kernels:
            for layer in layers:
                setattr(layer, kind, kernel)
            elapsed = _pass_s(layers, inputs)
            if attempt:
                best[kernel] = min(best[kernel], elapsed)
    fastest = min(best, key=best.__getitem__)
    if "cpp" in best and best["cpp"] <= cpp_margin * best[fastest]:
        fastest = "cpp"
    return fastest, best


def one_row_products_s(model: nn.Module, passes: int = 3) -> float:
    """Best time of one pass of one-row products through every CpuLinear of `model`, each with the kernel it
    has (a warm-up pass first): what a batch-1 decode step takes if it does nothing but read its weights."""
    layers = [m for m in model.modules() if isinstance(m, CpuLinear)]
    inputs = _inputs(layers, 1)
    _pass_s(layers, inputs)  # warm-up
    return min(_pass_s(layers, inputs) for _ in range(passes))


def _inputs(layers: list[CpuLinear], rows: int) -> dict[int, torch.Tensor]:
    return {m.in_features: torch.randn(rows, m.in_features, dtype=m.weight.dtype) for m in layers}


def _pass_s(layers: list[CpuLinear], inputs: dict[int, torch.Tensor]) -> float:
    """Seconds for the inputs through each of `layers` in turn."""
    with torch.inference_mode():
        start = time.perf_counter()
        for layer in layers:
            layer(inputs[layer.in_features])
        return time.perf_counter() - start
