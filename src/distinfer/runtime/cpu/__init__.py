"""Speed for CPU pipeline ranks, fenced off: a CUDA run imports nothing of this package.

What a CPU stage gets, through one entry point (`speed_up_stage`), and what each paid for itself on
`make bench`'s 160 M Llama (docs/performance.md): linear layers whose one-row and few-row products run on
the fastest kernel timed on this machine (kernels.py, with the C++ `linear_rows` among them), weights in
2 MiB pages (hugepages.py), and for Llama stages decode steps without `transformers`' forward, in C++
between the products (llama_decode.py, cpp_ops.py, csrc/). Beside it, used by the rank's start-up and by
the pipeline: OpenMP's spin count for ranks that share a node (openmp.py, set before torch loads), pinned
threads (threads.py) and shared-memory rings between stages on one machine (shm_ring.py).

This file imports nothing heavy: the rank's entry point reads `openmp` before torch is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from distinfer.runtime.cpu.llama_decode import LlamaDecoder


def speed_up_stage(model: nn.Module, splits: int | None = None) -> tuple[dict, LlamaDecoder | None]:
    """What a CPU pipeline rank does to its stage with `cpu_kernels: fast`, in this order: linear layers to
    `CpuLinear` (row-split products in `splits` parts, default the thread count), weights into 2 MiB pages,
    the one-row and few-row kernels timed and chosen (distinfer's C++ `linear_rows` among them where the C++ ops
    build; the machine's ranks take turns for the copy and the timing), then the Llama decode path (None for
    other families). Returns the facts a rank reports and the decoder for `PipelineEngine`."""
    from distinfer.runtime.cpu.cpp_ops import decode_ops
    from distinfer.runtime.cpu.hugepages import place_in_huge_pages
    from distinfer.runtime.cpu.kernels import choose_kernels, use_fast_cpu_linears
    from distinfer.runtime.cpu.llama_decode import ONE_CALL_MARGIN, decodes_llama, llama_decoder
    from distinfer.runtime.cpu.threads import machine_turn

    fast = use_fast_cpu_linears(model, splits)
    margin = ONE_CALL_MARGIN if decodes_llama(model) else 1.0  # linear_rows lets a Llama step run in one C++ call
    ops = decode_ops() if fast else None
    with machine_turn("kernel-timing"):  # the machine's other ranks neither copy weights nor time meanwhile
        facts = {"fast_linears": fast, "huge_page_bytes": place_in_huge_pages(model),
                 "kernels": choose_kernels(model, ops, cpp_margin=margin)}
    return facts, llama_decoder(model)
