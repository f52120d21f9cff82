"""The CPU profile, measured: matrix-product FLOP/s per dtype and read bandwidth by working-set size (a
weight matrix that stays in the last-level cache is read several times faster than one in main memory), at one
thread and at every core of this process's affinity, the host cost of one small PyTorch operation, the wake-up
of another process, and a hand-off between two pipeline stages (handoff.py).

A probe checks itself: other processes' CPU time while it ran, all cores against one, and the spread of its
repeats; a disturbed probe is taken again and, if it stays disturbed, kept with the reasons, which every
prediction made from it then states. Kept in the cache folder per host and core count (`measure_cpu(fresh=True)`
measures again); reading it back needs no torch."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

from distinfer.predict.hardware import DTYPES

PROBE_VERSION = 5
ATTEMPTS = 3  # a probe found disturbed is taken again this many times in all, then kept with a warning
QUIET_LIMIT = 0.25  # other processes' CPU time during a probe, in cores: above it the machine was busy
SPREAD_LIMIT = 0.5  # the slowest of a matrix product's repeats against the fastest: above it the timing is noisy
ALL_CORES_FLOOR = 0.9  # every core's FLOP/s below this share of one core's: the cores were not all ours
MATMUL_SIZE = {"float32": 1024, "float16": 256, "bfloat16": 512}  # CPUs without half units are slow at fp16
READ_SIZES_MB = (1, 4, 16, 64, 256, 1024)  # working sets from the caches to main memory


def _timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """The fastest of `repeats` timings after a warm-up, and the spread (slowest / fastest - 1)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), max(times) / min(times) - 1


def _best(fn: Callable[[], object], repeats: int) -> float:
    return _timed(fn, repeats)[0]


def _measure(threads: int) -> dict:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        flops, spread = {}, {}
        for dtype in DTYPES:
            n = MATMUL_SIZE[dtype]
            a = torch.ones(n, n, dtype=getattr(torch, dtype))
            b = torch.ones(n, n, dtype=getattr(torch, dtype))
            best, spread[dtype] = _timed(lambda: torch.mm(a, b), 3)
            flops[dtype] = 2 * n**3 / best
        reads = []
        for megabytes in READ_SIZES_MB:
            x = torch.ones(megabytes * 2**20 // 4)
            reads.append([megabytes * 2**20, megabytes * 2**20 / _best(x.sum, max(3, 256 // megabytes))])
            del x
        return {"flops": flops, "read": reads, "spread": spread}
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
    from distinfer.probes.handoff import handoff_s

    found = [h for h in (handoff_s() for _ in range(3)) if h is not None]
    return min(found) if found else None


def probe_path(cache: Path, cores: int) -> Path:
    host = platform.node().replace("/", "_") or "host"
    return cache / f"cpu-probe-{host}-{cores}c.json"


def _busy_s() -> tuple[float, float]:
    """CPU seconds spent so far by the whole machine and by this process (its waited-for children included)."""
    import psutil

    machine = psutil.cpu_times()
    busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
    own = psutil.Process().cpu_times()
    return busy, own.user + own.system + own.children_user + own.children_system


def _figures(cores: int) -> tuple[dict, dict]:
    """One measurement of the figures, and its conditions: how many cores' worth of CPU time other processes took
    meanwhile, and the load average."""
    start, (busy, own) = time.monotonic(), _busy_s()
    one, every = _measure(1), _measure(cores)
    figures = {"flops_1": one["flops"], "flops_all": every["flops"], "read_1": one["read"], "read_all": every["read"],
               "launch_s": _launch_s(), "wake_s": _wake_s()}
    wall, (busy_end, own_end) = time.monotonic() - start, _busy_s()
    conditions = {"other_processes_cores": max(0.0, (busy_end - busy) - (own_end - own)) / wall,
                  "load_average_1m": os.getloadavg()[0],
                  "spread": {"1": one["spread"], "all": every["spread"]}}
    return figures, conditions


def probe_problems(figures: dict, conditions: dict, cores: int) -> list[str]:
    """Why a probe's figures cannot be trusted: other processes took the cores, all cores measured slower than
    one, or a matrix product's repeats spread beyond SPREAD_LIMIT. Empty when none of these holds."""
    problems = []
    others = conditions.get("other_processes_cores", 0.0)
    if others > QUIET_LIMIT:
        problems.append(f"other processes took {others:.2f} cores meanwhile")
    if cores > 1:
        slower = [d for d in figures["flops_1"] if figures["flops_all"][d] < ALL_CORES_FLOOR * figures["flops_1"][d]]
        if slower:
            problems.append(f"{', '.join(slower)} on all {cores} cores measured slower than on one")
    noisy = sorted({d for spreads in conditions.get("spread", {}).values() for d, x in spreads.items()
                    if x > SPREAD_LIMIT})
    if noisy:
        problems.append(f"the {', '.join(noisy)} repeats spread beyond {SPREAD_LIMIT:.0%}")
    return problems


def measure_cpu(cache: Path | None = None, fresh: bool = False) -> dict:
    """This machine's CPU figures: {cores, flops_1 and flops_all ({dtype: FLOP/s}), read_1 and read_all ([working set
    bytes, read bytes/s] from the caches to main memory), launch_s, wake_s, handoff_s (None without shared-memory
    rings), measured, conditions, disturbed}. A measurement that `probe_problems` finds fault with is taken again,
    up to ATTEMPTS times; the last one is kept with the reasons in `disturbed` (None when the probe was clean),
    which the prediction then reports."""
    cores = _cores()
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
    for attempt in range(1, ATTEMPTS + 1):
        figures, conditions = _figures(cores)
        problems = probe_problems(figures, conditions, cores)
        if not problems:
            break
    data = {"version": PROBE_VERSION, "cores": cores, **figures, "handoff_s": _handoff_s(),
            "measured": time.strftime("%Y-%m-%dT%H:%M:%S"), "conditions": {**conditions, "attempts": attempt},
            "disturbed": "; ".join(problems) or None}
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    return data


def read_probe(cache: Path) -> dict | None:
    """The cached probe of this machine (this host and core count), or None where there is none of this version."""
    path = probe_path(cache, _cores())
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("version") == PROBE_VERSION else None


def probe_in_child(cache: Path, fresh: bool = False) -> dict:
    """The probe, measured in a child process (`python -m distinfer.probes.cpu CACHE`), which writes it to the
    cache: the caller (plan, predict, analyze) never imports torch. ValueError with the child's message where it
    cannot measure (no PyTorch)."""
    import subprocess
    import sys

    if not fresh and (data := read_probe(cache)) is not None:
        return data
    proc = subprocess.run([sys.executable, "-m", "distinfer.probes.cpu", str(cache), *(["--fresh"] if fresh else [])],
                          capture_output=True, text=True)
    data = read_probe(cache)
    if proc.returncode != 0 or data is None:
        raise ValueError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else
                         f"the CPU probe failed (exit {proc.returncode})")
    return data


def cpu_probe(cache: Path) -> Callable[[], dict]:
    """The probe as the performance model takes it: read from `cache`, or measured in a child process at the
    first call, then kept."""
    import functools

    return functools.cache(lambda: probe_in_child(cache))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def main() -> None:
    """`python -m distinfer.probes.cpu CACHE [--fresh]`: measure this machine into CACHE (exit 2 and one line on
    stderr where it cannot)."""
    import sys

    args = sys.argv[1:]
    try:
        measure_cpu(Path(args[0]), fresh="--fresh" in args)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
