"""Hardware profiles: usable memory per device and the dtypes it computes in."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    memory_bytes: int  # usable by one rank (GPU memory, or host memory share on CPU)
    dtypes: tuple[str, ...]
    gpu: bool
    note: str = ""


HARDWARE = {
    p.name: p
    for p in (
        # A T4 has 16 GB of GDDR6 of which about 15 GiB are usable after ECC and the CUDA context's own share.
        HardwareProfile("t4-16gb", 15 * GIB, ("float32", "float16"), True,
                        "compute capability 7.5: no bfloat16, no FlashAttention 2"),
        HardwareProfile("a100-40gb", 39 * GIB, ("float32", "float16", "bfloat16"), True),
        HardwareProfile("a100-80gb", 79 * GIB, ("float32", "float16", "bfloat16"), True),
        HardwareProfile("h100-80gb", 79 * GIB, ("float32", "float16", "bfloat16"), True),
        HardwareProfile("cpu", 8 * GIB, ("float32", "float16", "bfloat16"), False, "CPU ranks over gloo"),
    )
}
