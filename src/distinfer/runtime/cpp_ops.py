"""C++ ops that PyTorch compiles at first use (`torch.utils.cpp_extension`), kept in distinfer's cache.

Two kinds: DeepSpeed's CPU all-reduce (runtime/tensor.py) and distinfer's own decode-step ops
(`csrc/decode_ops.cpp` and `csrc/decode_layers.cpp`, used by runtime/llama_decode.py, with
`csrc/linear_rows.cpp`, used by runtime/kernels.py). Both build into `$DISTINFER_CACHE/torch_extensions`
(or the user's TORCH_EXTENSIONS_DIR) one rank at a time: PyTorch guards each op's build directory with a
`lock` file that a killed build leaves behind, and every later build or load of that op then waits for it
forever. The ranks of a node take turns under an flock, which the kernel releases when its holder dies:
whoever holds it knows that no build is running in distinfer's own directory, so any `lock` file there is
stale and goes. A directory the user chose may be shared with other programs and is left alone.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from distinfer.models.tiny import cache_dir
from distinfer.runtime.threads import exclusive_lock

log = logging.getLogger("distinfer.cpp_ops")
CSRC = Path(__file__).resolve().parent / "csrc"
DECODE_OPS_SOURCES = (CSRC / "decode_ops.cpp", CSRC / "linear_rows.cpp", CSRC / "decode_layers.cpp")


def extensions_dir() -> Path:
    """Where distinfer keeps the ops it and DeepSpeed compile (unless the user set TORCH_EXTENSIONS_DIR)."""
    return cache_dir() / "torch_extensions"


def extensions_root() -> Path:
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or extensions_dir())


@contextmanager
def build_turn() -> Iterator[Path]:
    """Hold this node's turn to build or load an op; yields the extensions directory."""
    root = extensions_root()
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / "distinfer-build.lock"):
        if root == extensions_dir():
            for path in remove_stale_build_locks(root):
                log.warning("removed %s, left by an op build that was killed", path)
        yield root


def remove_stale_build_locks(root: Path) -> list[Path]:
    """Remove the `lock` files that killed op builds left in `root`'s build directories; returns them.
    Only safe while no build can be running there (see `build_turn`)."""
    stale = sorted(root.glob("*/lock"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


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
