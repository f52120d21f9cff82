"""The probe of a hand-off between two stages on one machine: two processes, each with every core's threads as a
pipeline stage without micro-batches has, take turns computing and pass a message through the pipeline's
shared-memory ring (runtime/cpu/shm_ring.py). What a round costs beyond the two computations, halved, is one
hand-off: the copy, the futex wake-up, the woken process's way back onto the cores and the Python around them.

Both processes start with OpenMP's spin count as ranks that share a node have it (runtime/cpu/openmp.py), so that
the waiting one's threads leave the cores to the other as the stages' do.

    python -m distinfer.probes.handoff                               prints one hand-off's seconds
    python -m distinfer.probes.handoff RING_IN RING_OUT PARENT_PID   (the second process, which the first starts)
"""

from __future__ import annotations

import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

SLOT_BYTES = 1 << 16
MESSAGE = 1024  # floats: one row of a 4096-wide model


def _work():  # noqa: ANN202 - a closure over torch tensors
    import torch

    x, w = torch.ones(64, 512), torch.ones(512, 512)

    def run() -> None:
        for _ in range(2):
            torch.mm(x, w)

    return run


def handoff_s(timeout_s: float = 120) -> float | None:
    """Seconds one hand-off between two stages of this machine costs; None where the rings are not supported or
    the probe failed."""
    from distinfer.runtime.cpu.openmp import SHARED_NODE_SPINCOUNT

    env = {**os.environ, "GOMP_SPINCOUNT": SHARED_NODE_SPINCOUNT}
    try:
        proc = subprocess.run([sys.executable, "-m", "distinfer.probes.handoff"], capture_output=True, text=True,
                              env=env, timeout=timeout_s)
        return float(proc.stdout.strip()) if proc.returncode == 0 and proc.stdout.strip() != "none" else None
    except (subprocess.TimeoutExpired, ValueError):
        return None


def _lead(rounds: int = 200) -> float | None:
    import torch

    from distinfer.runtime.cpu.shm_ring import SHM_DIR, SharedRing, supported

    if not supported():
        return None
    stem = f"distinfer-probe-{os.getpid()}-{secrets.token_hex(4)}"
    paths = (SHM_DIR / f"{stem}-there", SHM_DIR / f"{stem}-back")
    there = SharedRing(paths[0], 4, SLOT_BYTES, True, 60.0)
    back = SharedRing(paths[1], 4, SLOT_BYTES, True, 60.0)
    child = subprocess.Popen([sys.executable, "-m", "distinfer.probes.handoff", str(paths[0]), str(paths[1]),
                              str(os.getpid())])
    try:
        back.peer_pid = there.peer_pid = child.pid
        msg, out = torch.ones(MESSAGE), torch.empty(MESSAGE)
        work = _work()
        there.send(msg)  # the other process is up once this comes back
        back.recv(out)
        for path in paths:
            path.unlink(missing_ok=True)
        alone = []
        for _ in range(50):
            start = time.perf_counter()
            work()
            alone.append(time.perf_counter() - start)
        trips = []
        for _ in range(rounds):
            start = time.perf_counter()
            work()
            there.send(msg)
            back.recv(out)
            trips.append(time.perf_counter() - start)
        msg.fill_(-1.0)
        there.send(msg)
        return max(0.0, (statistics.median(trips) - 2 * statistics.median(alone)) / 2)
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _echo(ring_in: Path, ring_out: Path, parent: int) -> None:
    import torch

    from distinfer.runtime.cpu.shm_ring import SharedRing

    incoming = SharedRing(ring_in, 4, SLOT_BYTES, False, 60.0)
    outgoing = SharedRing(ring_out, 4, SLOT_BYTES, False, 60.0)
    incoming.peer_pid = outgoing.peer_pid = parent
    buf = torch.empty(MESSAGE)
    incoming.recv(buf)
    outgoing.send(buf)
    work = _work()
    while True:
        incoming.recv(buf)
        if buf[0] < 0:
            return
        work()
        outgoing.send(buf)


if __name__ == "__main__":
    if len(sys.argv) == 1:
        found = _lead()
        print("none" if found is None else repr(found))
    else:
        _echo(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
