"""The CPU profile, measured: matrix-product FLOP/s per dtype and memory copy bandwidth, at one thread and at every
core of this process's affinity, and the host cost of one small PyTorch operation. Kept in the cache folder per
host, core count and torch version (`measure_cpu(fresh=True)` measures again)."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

from distinfer.predict.hardware import DTYPES

PROBE_VERSION = 2
MATMUL_SIZE = {"float32": 1024, "float16": 256, "bfloat16": 512}  # CPUs without half units are slow at fp16


def _best(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _measure(threads: int) -> dict:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        flops = {}
        for dtype in DTYPES:
            n = MATMUL_SIZE[dtype]
            a = torch.ones(n, n, dtype=getattr(torch, dtype))
            b = torch.ones(n, n, dtype=getattr(torch, dtype))
            flops[dtype] = 2 * n**3 / _best(lambda: torch.mm(a, b), 3)
        src = torch.ones(128 * 2**20 // 4)
        dst = torch.empty_like(src)
        bandwidth = 2 * src.numel() * 4 / _best(lambda: dst.copy_(src), 5)
        return {"flops": flops, "bandwidth": bandwidth}
    finally:
        torch.set_num_threads(previous)


def _launch_s() -> float:
    import torch

    x = torch.ones(16)
    n = 2000
    return _best(lambda: [x.add(1) for _ in range(n)], 3) / n


_ECHO = "import os\nwhile True:\n    b = os.read(0, 1)\n    if not b:\n        break\n    os.write(1, b)\n"


def _wake_s(rounds: int = 400) -> float:
    """Half the round trip of one byte to another process and back through pipes: what a message between two
    ranks of this machine costs before its bytes (the other process sleeps in between, as a waiting rank does)."""
    import subprocess
    import sys

    echo = subprocess.Popen([sys.executable, "-c", _ECHO], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert echo.stdin is not None and echo.stdout is not None
        out, back = echo.stdin.fileno(), echo.stdout.fileno()
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            os.write(out, b"x")
            os.read(back, 1)
            times.append(time.perf_counter() - start)
        times.sort()
        return times[len(times) // 2] / 2
    finally:
        echo.stdin.close()  # type: ignore[union-attr]
        echo.wait(timeout=10)


def probe_path(cache: Path, cores: int) -> Path:
    import torch

    host = platform.node().replace("/", "_") or "host"
    return cache / f"cpu-probe-{host}-{cores}c-torch{torch.__version__.split('+')[0]}.json"


def measure_cpu(cache: Path | None = None, fresh: bool = False) -> dict:
    """This machine's CPU figures: {cores, flops_1, flops_all, bandwidth_1, bandwidth_all, launch_s, wake_s,
    measured}."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    path = probe_path(cache, cores) if cache else None
    if path and path.is_file() and not fresh:
        data = json.loads(path.read_text())
        if data.get("version") == PROBE_VERSION:
            return data
    one, every = _measure(1), _measure(cores)
    data = {"version": PROBE_VERSION, "cores": cores, "flops_1": one["flops"], "flops_all": every["flops"],
            "bandwidth_1": one["bandwidth"], "bandwidth_all": every["bandwidth"], "launch_s": _launch_s(),
            "wake_s": _wake_s(),
            "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    return data
