"""Utilization sampled during a run: CPU and RSS with psutil, GPU utilization and memory with NVML."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping

import psutil


class UtilizationSampler:
    """A daemon thread that samples this process every `interval_s` until stopped."""

    def __init__(self, interval_s: float = 0.5, gpu_index: int | None = None) -> None:
        self.interval_s = interval_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="utilization")
        self._process = psutil.Process()
        self._nvml = _nvml_handle(gpu_index) if gpu_index is not None else None

    def _sample(self) -> dict:
        sample = {
            "t": time.time(),
            "cpu_percent": self._process.cpu_percent(None),
            "rss_bytes": self._process.memory_info().rss,
        }
        if self._nvml is not None:
            import pynvml

            util = pynvml.nvmlDeviceGetUtilizationRates(self._nvml)
            mem = pynvml.nvmlDeviceGetMemoryInfo(self._nvml)
            sample.update(gpu_util_percent=util.gpu, gpu_memory_used_bytes=mem.used)
        return sample

    def _loop(self) -> None:
        self._process.cpu_percent(None)  # the first call only starts the measurement
        while not self._stop.wait(self.interval_s):
            self.samples.append(self._sample())

    def __enter__(self) -> UtilizationSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def summary(self) -> dict:
        cpu = [s["cpu_percent"] for s in self.samples]
        rss = [s["rss_bytes"] for s in self.samples] or [self._process.memory_info().rss]
        out = {
            "samples": len(self.samples),
            "cpu_percent_mean": sum(cpu) / len(cpu) if cpu else None,
            "peak_rss_bytes": max(rss),
        }
        gpu = [s["gpu_util_percent"] for s in self.samples if "gpu_util_percent" in s]
        if gpu:
            out["gpu_util_percent_mean"] = sum(gpu) / len(gpu)
            out["gpu_memory_used_peak_bytes"] = max(s["gpu_memory_used_bytes"] for s in self.samples)
        return out


def nvml_target(local_index: int, environ: Mapping[str, str]) -> tuple[str, str | int]:
    """Which physical GPU a process's CUDA device `local_index` is, as NVML names it: ("uuid", "GPU-...") or
    ("index", n). NVML ignores CUDA_VISIBLE_DEVICES, so under Slurm's GPU binding (CUDA_VISIBLE_DEVICES=2,3)
    CUDA's device 0 is NVML's GPU 2; an index of `local_index` would sample another job's GPU."""
    visible = [v.strip() for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if "CUDA_VISIBLE_DEVICES" not in environ or local_index >= len(visible):
        return ("index", local_index)
    entry = visible[local_index]
    return ("index", int(entry)) if entry.isdigit() else ("uuid", entry)


def _nvml_handle(index: int):  # -> pynvml handle | None
    try:
        import pynvml

        pynvml.nvmlInit()
        kind, value = nvml_target(index, os.environ)
        if kind == "uuid":
            return pynvml.nvmlDeviceGetHandleByUUID(value)
        return pynvml.nvmlDeviceGetHandleByIndex(value)
    except Exception:  # no NVML library or no GPU: utilization stays CPU-only
        return None


def gpu_facts(device_index: int | None) -> dict:
    """What run.json records of a rank's GPU: model, memory, driver, CUDA and NCCL versions, and the node's
    topology (`nvidia-smi topo -m`); {} on CPU. Each fact that cannot be read is left out."""
    if device_index is None:
        return {}
    import torch

    facts: dict = {"cuda": torch.version.cuda}
    try:
        props = torch.cuda.get_device_properties(device_index)
        facts.update(gpu=props.name, gpu_memory_bytes=int(props.total_memory),
                     compute_capability=f"{props.major}.{props.minor}")
    except Exception:  # noqa: BLE001 - facts are best effort
        pass
    try:
        facts["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:  # noqa: BLE001
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        facts["driver"] = driver.decode() if isinstance(driver, bytes) else driver
    except Exception:  # noqa: BLE001
        pass
    topology = node_topology()
    if topology:
        facts["topology"] = topology
    return facts


def node_topology() -> str | None:
    """`nvidia-smi topo -m`: how the node's GPUs, NICs and CPUs connect (NVLink, PCIe switch, ...), or None."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        proc = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None
