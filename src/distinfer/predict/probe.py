"""The CPU profile, measured: matrix-product FLOP/s per dtype and read bandwidth by working-set size (a
weight matrix that stays in the last-level cache is read several times faster than one in main memory), at one
thread and at every core of this process's affinity, the host cost of one small PyTorch operation and the wake-up of another process.
A hand-off between two pipeline stages of this machine is probed too (handoff.py). Kept in the cache folder per host and core count (`measure_cpu(fresh=True)` measures again); reading it back
needs no torch."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

from distinfer.predict.hardware import DTYPES

PROBE_VERSION = 4
MATMUL_SIZE = {"float32": 1024, "float16": 256, "bfloat16": 512}  # CPUs without half units are slow at fp16
READ_SIZES_MB = (1, 4, 16, 64, 256, 1024)  # working sets from the caches to main memory


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
        reads = []
        for megabytes in READ_SIZES_MB:
            x = torch.ones(megabytes * 2**20 // 4)
            reads.append([megabytes * 2**20, megabytes * 2**20 / _best(x.sum, max(3, 256 // megabytes))])
            del x
        return {"flops": flops, "read": reads}
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


def _handoff_s() -> float | None:
    """The least of three hand-off probes (handoff.py), as the other figures are the best of their repeats: on a
    shared machine a probe that lands in a moment of contention measures the contention (2 ms against 0.3)."""
    from distinfer.predict.handoff import handoff_s

    found = [h for h in (handoff_s() for _ in range(3)) if h is not None]
    return min(found) if found else None


def probe_path(cache: Path, cores: int) -> Path:
    host = platform.node().replace("/", "_") or "host"
    return cache / f"cpu-probe-{host}-{cores}c.json"


def measure_cpu(cache: Path | None = None, fresh: bool = False) -> dict:
    """This machine's CPU figures: {cores, flops_1 and flops_all ({dtype: FLOP/s}), read_1 and read_all ([working set
    bytes, read bytes/s] from the caches to main memory), launch_s, wake_s, handoff_s (None without shared-memory
    rings), measured}."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    path = probe_path(cache, cores) if cache else None
    if path and path.is_file() and not fresh:
        data = json.loads(path.read_text())
        if data.get("version") == PROBE_VERSION:
            return data
    try:
        import torch  # noqa: F401 - is it there?
    except ImportError:
        raise ValueError("the CPU profile is measured on this machine with PyTorch, which is not installed: "
                         "pip install 'distinfer[runtime]', or give the device's figures in a hardware file "
                         "(--hardware)") from None
    one, every = _measure(1), _measure(cores)
    data = {"version": PROBE_VERSION, "cores": cores, "flops_1": one["flops"], "flops_all": every["flops"],
            "read_1": one["read"], "read_all": every["read"], "launch_s": _launch_s(),
            "wake_s": _wake_s(), "handoff_s": _handoff_s(),
            "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    return data
