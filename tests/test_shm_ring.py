"""Shared-memory rings between real processes (runtime/cpu/shm_ring.py): order, a full ring, a dead or silent peer,
and the collective set-up over a real gloo group. The pipeline's own use is in test_pipeline_exact.py."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from distinfer.runtime.cpu.shm_ring import SHM_DIR, PeerGone, SharedRing, connect_rings

MESSAGES = [torch.arange(6, dtype=torch.float32).view(2, 3), torch.tensor([7, 8], dtype=torch.long),
            torch.full((1, 1, 40), -1.5), torch.tensor([2**40 + 3]), torch.ones(1, 1, 40) / 3,
            torch.arange(10, dtype=torch.float64), torch.tensor([1])]


def _sender(path: str, slots: int, slot_bytes: int, count: int) -> None:
    ring = SharedRing(Path(path), slots, slot_bytes, False, timeout_s=30)
    ring.peer_pid = os.getppid()
    for message in MESSAGES[:count]:
        ring.send(message)


def _ring_path(tmp_name: str) -> Path:
    return SHM_DIR / f"distinfer-test-{os.getpid()}-{tmp_name}"


@contextmanager
def _ring_from_child(tag: str, count: int, timeout_s: float) -> Iterator[tuple[SharedRing, mp.Process]]:
    """A receiving ring of 2 slots of 512 bytes and a spawned child sending it the first `count` MESSAGES;
    the child is killed and the file removed afterwards, whatever the test did."""
    path = _ring_path(tag)
    ring = SharedRing(path, 2, 512, True, timeout_s=timeout_s)
    child = mp.get_context("spawn").Process(target=_sender, args=(str(path), 2, 512, count))
    try:
        child.start()
        ring.peer_pid = child.pid
        yield ring, child
    finally:
        path.unlink(missing_ok=True)
        if child.is_alive():
            child.kill()
            child.join()


def test_messages_arrive_in_order_through_a_full_ring() -> None:
    with _ring_from_child("order", len(MESSAGES), 30) as (ring, child):
        time.sleep(1.0)  # the sender fills both slots and waits for the receiver to free one
        assert child.is_alive(), "with 2 slots the sender must wait for the third message"
        got = [ring.recv(torch.empty_like(m)) for m in MESSAGES]
        child.join(30)
        assert child.exitcode == 0
        assert all(torch.equal(g, m) for g, m in zip(got, MESSAGES, strict=True))


def test_a_receive_from_a_dead_sender_fails_within_a_second() -> None:
    with _ring_from_child("dead", 1, 60) as (ring, child):
        assert torch.equal(ring.recv(torch.empty(2, 3)), MESSAGES[0])
        child.join(30)
        start = time.monotonic()
        with pytest.raises(PeerGone, match=f"pid {child.pid}"):
            ring.recv(torch.empty(2))
        assert time.monotonic() - start < 1.0


def test_a_silent_peer_fails_the_receive_after_the_timeout() -> None:
    path = _ring_path("silent")
    try:
        receiver = SharedRing(path, 2, 64, True, timeout_s=0.3)
        sender = SharedRing(path, 2, 64, False, timeout_s=0.3)
        assert sender.fits(torch.empty(16)) and not sender.fits(torch.empty(17))
        start = time.monotonic()
        with pytest.raises(PeerGone, match="nothing moved"):
            receiver.recv(torch.empty(4))
        assert 0.3 <= time.monotonic() - start < 2.0
        sender.send(torch.tensor([1.0, 2.0]))
        assert receiver.recv(torch.empty(2)).tolist() == [1.0, 2.0]
    finally:
        path.unlink(missing_ok=True)


def _ranks(rank: int, port: int, queue) -> None:  # noqa: ANN001
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        incoming, outgoing = connect_rings(dist.group.WORLD, rank, [1 - rank], [1 - rank], 3, 1024, 30)
        outgoing[1 - rank].send(torch.tensor([10 * rank + 1, 10 * rank + 2]))
        got = incoming[1 - rank].recv(torch.empty(2, dtype=torch.long)).tolist()
        ring = incoming[1 - rank]
        queue.put((rank, got, ring.path.exists(), ring.peer_pid, outgoing[1 - rank].peer_pid, os.getpid()))
    finally:
        dist.destroy_process_group()


def test_connect_rings_pairs_two_gloo_ranks_and_leaves_no_file() -> None:
    import torch.multiprocessing as tmp

    from distinfer.net import free_port

    before = set(SHM_DIR.glob("distinfer-*"))
    queue = tmp.get_context("spawn").Queue()
    procs = tmp.start_processes(_ranks, args=(free_port(), queue), nprocs=2, start_method="spawn", join=False)
    try:
        results = sorted(queue.get(timeout=120) for _ in range(2))
        while not procs.join(timeout=60):
            pass
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
                p.join()
    assert [r[:3] for r in results] == [(0, [11, 12], False), (1, [1, 2], False)]
    pids = [r[5] for r in results]
    assert [r[3:5] for r in results] == [(pids[1], pids[1]), (pids[0], pids[0])], "each end watches the other"
    assert set(SHM_DIR.glob("distinfer-*")) <= before, "the rings' files are unlinked once both ends hold them"
