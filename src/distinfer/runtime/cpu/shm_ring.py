"""Messages between two ranks of one machine through shared memory, woken by a futex.

gloo carries a CPU rank's message through a TCP socket and a loop thread on each side, so a batch-1 decode
step's hand-off wakes four threads one after the other (docs/performance.md has what that cost).
A `SharedRing` is a file under /dev/shm, mapped by the two ranks: a header with the count of messages
written and the count read, then `slots` slots of `slot_bytes`. The sender copies a message into the next
slot, publishes it by raising the written count and wakes the receiver with futex(2); the receiver sleeps in
futex(2) until the count moves (no spinning: on a shared node the other stage needs the cores), copies the
message out and raises the read count.

A wait wakes every `POLL_S` to check that the peer process still lives and that `timeout_s` has not passed,
so a dead peer fails the receive within a fraction of a second, as a closed gloo connection does.

Linux on x86-64 only: the futex call goes through libc's `syscall`, and x86's store order makes a slot's
bytes visible to the receiver before the count that publishes them. Elsewhere, or where the two ranks do
not share /dev/shm (containers with their own), `connect_rings` gives no ring and the pipeline keeps gloo.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import secrets
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

SHM_DIR = Path("/dev/shm")
HEADER = 128  # bytes: the written count at 0, the read count at 64 (a cache line each)
_WRITTEN, _READ = 0, 16  # int32 offsets of the counts
POLL_S = 0.1
_SYS_FUTEX = 202  # x86-64
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1  # shared (not FUTEX_PRIVATE): the two processes wait on one word
_ETIMEDOUT, _EAGAIN, _EINTR = 110, 11, 4


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def supported() -> bool:
    return sys.platform == "linux" and platform.machine() == "x86_64" and SHM_DIR.is_dir()


class PeerGone(RuntimeError):
    """The other end of a ring exited, or sent nothing within the timeout."""


class SharedRing:
    """One direction between two processes; `send` on one side, `recv` on the other, messages in order."""

    def __init__(self, path: Path, slots: int, slot_bytes: int, create: bool, timeout_s: float) -> None:
        size = HEADER + slots * slot_bytes
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            elif os.fstat(fd).st_size != size:
                raise ValueError(f"{path} has {os.fstat(fd).st_size} bytes, expected {size}")
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.path, self.slots, self.slot_bytes, self.timeout_s = path, slots, slot_bytes, timeout_s
        self.peer_pid = 0  # set once the peer is known; 0 = do not check
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self._counts = {i: ctypes.c_int32.from_buffer(self._map, 4 * i) for i in (_WRITTEN, _READ)}
        self._addr = {i: ctypes.c_void_p(ctypes.addressof(c)) for i, c in self._counts.items()}
        self._done = 0  # messages this side has sent or received

    def fits(self, tensor: torch.Tensor) -> bool:
        return tensor.numel() * tensor.element_size() <= self.slot_bytes

    def _slot(self, nbytes: int) -> torch.Tensor:
        start = HEADER + (self._done % self.slots) * self.slot_bytes
        return self._bytes[start : start + nbytes]

    def send(self, tensor: torch.Tensor) -> None:
        """Copy `tensor` (contiguous, at most `slot_bytes`) into the next slot; waits only while every slot
        holds a message the receiver has not taken."""
        self._await(_READ, lambda read: self._done - read < self.slots)
        self._slot(tensor.numel() * tensor.element_size()).copy_(tensor.reshape(-1).view(torch.uint8))
        self._done += 1
        self._counts[_WRITTEN].value = self._done
        _futex(self._addr[_WRITTEN], _FUTEX_WAKE, 1)

    def recv(self, out: torch.Tensor) -> torch.Tensor:
        """Wait for the next message and copy it into `out` (contiguous, the sender's shape and dtype)."""
        self._await(_WRITTEN, lambda written: written > self._done)
        out.view(-1).view(torch.uint8).copy_(self._slot(out.numel() * out.element_size()))
        self._done += 1
        self._counts[_READ].value = self._done
        _futex(self._addr[_READ], _FUTEX_WAKE, 1)
        return out

    def _await(self, index: int, ready) -> None:  # noqa: ANN001
        start = time.monotonic()
        while True:
            value = self._counts[index].value
            if ready(value):
                return
            if _futex(self._addr[index], _FUTEX_WAIT, value, POLL_S) == _ETIMEDOUT:
                if self.peer_pid and not _alive(self.peer_pid):
                    raise PeerGone(f"the process at the other end of {self.path.name} (pid {self.peer_pid}) exited")
                if time.monotonic() - start > self.timeout_s:
                    raise PeerGone(f"nothing moved on {self.path.name} in {self.timeout_s:g} s")


_syscall = None


def _futex(addr: ctypes.c_void_p, op: int, value: int, timeout_s: float | None = None) -> int:
    """futex(2) on the int32 at `addr`; returns 0 or the errno (ETIMEDOUT, EAGAIN: the value had changed)."""
    global _syscall
    if _syscall is None:
        _syscall = ctypes.CDLL(None, use_errno=True).syscall  # ctypes lets go of the GIL while it waits
    timeout = None
    if timeout_s is not None:
        timeout = ctypes.byref(_Timespec(int(timeout_s), int(timeout_s % 1 * 1e9)))
    if _syscall(_SYS_FUTEX, addr, op, ctypes.c_int(value), timeout, None, 0) == -1:
        return ctypes.get_errno()
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def connect_rings(group: dist.ProcessGroup, rank: int, sources: list[int], destinations: list[int], slots: int,
                  slot_bytes: int, timeout_s: float) -> tuple[dict[int, SharedRing], dict[int, SharedRing]]:
    """Collective over `group` (every rank calls it): rings from each of `sources` into this rank and from
    this rank to each of `destinations` (ranks of `group`), where both ends can map the same file. Returns
    (incoming by source, outgoing by destination); a pair without a ring keeps `group`'s send and recv.
    Each receiver creates its rings and names them to all; each sender opens what it is named; the files are
    unlinked once both ends hold them (nothing stays in /dev/shm after the run, even if it is killed)."""
    incoming: dict[int, SharedRing] = {}
    if supported():
        for src in sources:
            path = SHM_DIR / f"distinfer-{os.getpid()}-{src}-{rank}-{secrets.token_hex(4)}"
            try:
                incoming[src] = SharedRing(path, slots, slot_bytes, True, timeout_s)
            except OSError:
                break
    offers: list = [None] * dist.get_world_size(group)
    me = (os.getpid(), _pid_namespace())
    dist.all_gather_object(offers, (me, {src: str(r.path) for src, r in incoming.items()}), group=group)
    outgoing: dict[int, SharedRing] = {}
    for dst in destinations if supported() else []:
        peer, paths = offers[dst]
        if rank in paths:
            try:
                outgoing[dst] = SharedRing(Path(paths[rank]), slots, slot_bytes, False, timeout_s)
            except (OSError, ValueError):
                continue
            outgoing[dst].peer_pid = _checkable_pid(me, peer)
    opened: list = [None] * len(offers)
    dist.all_gather_object(opened, sorted(outgoing), group=group)
    for src, ring in list(incoming.items()):
        ring.path.unlink(missing_ok=True)
        if rank in opened[src]:
            ring.peer_pid = _checkable_pid(me, offers[src][0])
        else:
            del incoming[src]
    return incoming, outgoing


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _checkable_pid(me: tuple[int, str], peer: tuple[int, str]) -> int:
    """The peer's pid where this process can see it (same pid namespace), else 0: rely on the timeout."""
    return peer[0] if me[1] and me[1] == peer[1] else 0
