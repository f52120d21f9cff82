"""Utilization sampled during a run: CPU and RSS with psutil, GPU utilization and memory with NVML."""

from __future__ import annotations

import threading
import time

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


def _nvml_handle(index: int):  # -> pynvml handle | None
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # no NVML library or no GPU: utilization stays CPU-only
        return None
