"""Hardware profiles: usable memory per device, the dtypes it computes in, and the datasheet figures the
performance model (predict/) starts from: peak FLOP/s per dtype, memory bandwidth, the link between the
devices of one node, and a fixed cost per launched operation. The CPU profile has no datasheet: its speed is
measured on the machine (probes/cpu.py)."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
LAUNCH_S = 8e-6  # eager PyTorch: ~5 us CUDA launch + ~3 us of dispatch per operation (an assumption, not a datasheet)
A100_FLOPS = (("float32", 19.5e12), ("float16", 312e12), ("bfloat16", 312e12))


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    memory_bytes: int  # usable by one rank (GPU memory, or host memory share on CPU)
    dtypes: tuple[str, ...]
    gpu: bool
    note: str = ""
    peak_flops: tuple[tuple[str, float], ...] = ()  # (dtype, FLOP/s) dense, the fastest units for that dtype
    memory_bandwidth: float = 0.0  # bytes/s
    launch_s: float = 0.0  # host cost of one launched operation (kernel launch + PyTorch dispatch)
    node_link: str = "same-machine"  # how the devices of one node reach each other (predict/hardware.py LINKS)
    source: str = ""

    def flops(self, dtype: str) -> float:
        """Peak FLOP/s in `dtype` (int8 weight-only computes in its activations' dtype); 0.0 if unknown."""
        return dict(self.peak_flops).get(dtype, 0.0)


HARDWARE = {
    p.name: p
    for p in (
        # A T4 has 16 GB of GDDR6 of which about 15 GiB are usable after ECC and the CUDA context's own share.
        HardwareProfile("t4-16gb", 15 * GIB, ("float32", "float16"), True,
                        "compute capability 7.5: no bfloat16, no FlashAttention 2",
                        peak_flops=(("float32", 8.1e12), ("float16", 65e12)), memory_bandwidth=320e9,
                        launch_s=LAUNCH_S, node_link="pcie",
                        source="NVIDIA T4 Tensor Core GPU datasheet: 8.1 TFLOPS FP32, 65 TFLOPS FP16 (tensor), "
                               "320 GB/s GDDR6; PCIe Gen3 x16"),
        HardwareProfile("a100-40gb", 39 * GIB, ("float32", "float16", "bfloat16"), True,
                        peak_flops=A100_FLOPS, memory_bandwidth=1555e9, launch_s=LAUNCH_S, node_link="nvlink",
                        source="NVIDIA A100 datasheet: 19.5 TFLOPS FP32, 312 TFLOPS FP16/BF16 (tensor), "
                               "1,555 GB/s HBM2; NVLink 600 GB/s"),
        HardwareProfile("a100-80gb", 79 * GIB, ("float32", "float16", "bfloat16"), True,
                        peak_flops=A100_FLOPS, memory_bandwidth=2039e9, launch_s=LAUNCH_S, node_link="nvlink",
                        source="NVIDIA A100 datasheet (SXM 80GB): 19.5 TFLOPS FP32, 312 TFLOPS FP16/BF16 (tensor), "
                               "2,039 GB/s HBM2e; NVLink 600 GB/s"),
        HardwareProfile("h100-80gb", 79 * GIB, ("float32", "float16", "bfloat16"), True,
                        peak_flops=(("float32", 67e12), ("float16", 989e12), ("bfloat16", 989e12)),
                        memory_bandwidth=3.35e12, launch_s=LAUNCH_S, node_link="nvlink",
                        source="NVIDIA H100 datasheet (SXM): 67 TFLOPS FP32, 989 TFLOPS FP16/BF16 (tensor, dense), "
                               "3.35 TB/s HBM3; NVLink 900 GB/s"),
        HardwareProfile("cpu", 8 * GIB, ("float32", "float16", "bfloat16"), False, "CPU ranks over gloo",
                        source="measured on the machine (probes/cpu.py)"),
    )
}
