"""distinfer's decode-step ops for CPU Llama stages (`csrc/decode_ops.cpp`, `csrc/decode_layers.cpp`, used by
llama_decode.py, with `csrc/linear_rows.cpp`, used by kernels.py), compiled by PyTorch at first use into the
shared op cache, one rank of a node at a time (runtime/extensions.py).
"""

from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path
from types import ModuleType

from distinfer.runtime.extensions import build_turn

log = logging.getLogger("distinfer.cpp_ops")
CSRC = Path(__file__).resolve().parent / "csrc"
DECODE_OPS_SOURCES = (CSRC / "decode_ops.cpp", CSRC / "linear_rows.cpp", CSRC / "decode_layers.cpp")


@functools.cache
def decode_ops() -> ModuleType | None:
    """distinfer's decode-step ops, compiled on first use (~45 s on 2 cores, then loaded from the cache in
    ~0.2 s); None, with the reason logged once per process, where they cannot be built (no C++ compiler, ...)."""
    try:
        from torch.utils.cpp_extension import load

        name, flags = decode_ops_build()
        with build_turn() as root:
            build = root / name
            build.mkdir(exist_ok=True)
            return load(name, [str(source) for source in DECODE_OPS_SOURCES], extra_cflags=flags,
                        extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)
    except Exception as exc:  # noqa: BLE001 - any failure leaves the Python decode path in charge
        reason = str(exc).strip().splitlines()
        log.warning("C++ decode ops unavailable (%s): decode steps run in Python",
                    reason[-1] if reason else type(exc).__name__)
        return None


def decode_ops_build() -> tuple[str, list[str]]:
    """The op's name and compiler flags for this CPU: the widest vector instructions PyTorch's own kernels use
    here (AVX-512 or AVX2 + FMA: the attention's loops run ~1.7x faster with AVX2 than plain x86-64, the few-row
    products keep twice the dot products in AVX-512's registers), plain x86-64 / the platform's default
    elsewhere; OpenMP on, so that `at::parallel_for` splits work over the rank's threads (without it the loops
    run on one). The name carries the instruction set, so that nodes of different kinds sharing one cache never
    load each other's build."""
    import torch

    flags = ["-O3", "-fopenmp"]
    capability = torch.backends.cpu.get_cpu_capability() if platform.machine() in ("x86_64", "AMD64") else ""
    if capability == "AVX512":
        return "distinfer_decode_ops_avx512", [*flags, "-mavx512f", "-mavx2", "-mfma"]
    if capability == "AVX2":
        return "distinfer_decode_ops_avx2", [*flags, "-mavx2", "-mfma"]
    return "distinfer_decode_ops", flags
