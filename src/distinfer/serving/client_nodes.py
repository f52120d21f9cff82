"""The load sent from several nodes of a Slurm allocation (`scenario.client.nodes`), its records on one clock.

The job starts one load process per client node (`srun --ntasks-per-node=1`); the one with SLURM_PROCID 0 is the
coordinator: it builds the requests, probes the server, listens on a free port and writes where
(`client-nodes.json` in the run folder, with the job's id). Every other node connects to it (authenticated with
the job's own key, $DISTINFER_API_KEY) and measures its clock's offset against the coordinator's as NTP does:
it asks for the coordinator's time PINGS times and keeps the exchange with the shortest round trip, whose
offset is the coordinator's time minus the midpoint of send and receive here, within +/- half that round trip
(the uncertainty, written to the summary with the offset). The coordinator sends the warm-up requests, deals
the measured ones round-robin over the nodes with their planned offsets (a closed loop: the users too), sends
each node its share and, once every node's workers are ready, one start time on its own clock; each node
converts it with its offset, so every record it sends back is on the coordinator's clock already. A node that
ends early loses only its unfinished requests: each is recorded as failed, naming the node.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path

from distinfer.bundle import atomic_write_json
from distinfer.serving.client import Request, Target, perf_clock
from distinfer.serving.client_size import worker_processes
from distinfer.serving.records import RequestRecord
from distinfer.serving.workers import START_LEAD_S, HostShare, deal, failed_record, warm_up

COORDINATOR_FILE = "client-nodes.json"
PINGS = 64
CONNECT_TIMEOUT_S = 120.0


class ClientNodesError(RuntimeError):
    """A client node could not join the load."""


@dataclass
class NodeClock:
    """A client node and its clock against the coordinator's: coordinator time = this node's + offset_s."""

    node: int
    name: str
    offset_s: float
    uncertainty_s: float
    requests: int = 0
    processes: int | None = None
    cpu_share: float | None = None
    ended: str | None = None  # why the node ended before its share was done

    def to_summary(self) -> dict:
        return {"node": self.node, "name": self.name, "offset_ms": round(self.offset_s * 1e3, 4),
                "uncertainty_ms": round(self.uncertainty_s * 1e3, 4), "requests": self.requests,
                "processes": self.processes, "cpu_share": self.cpu_share,
                **({"ended": self.ended} if self.ended else {})}


def node_name() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def job_id() -> str:
    return os.environ.get("SLURM_JOB_ID", "")


def measure_offset(conn: Connection, pings: int = PINGS) -> tuple[float, float]:
    """(offset, uncertainty) of the coordinator's clock (time.perf_counter there) against this process's: the
    exchange with the shortest round trip of `pings`."""
    best = (float("inf"), 0.0)
    for _ in range(pings):
        sent = time.perf_counter()
        conn.send(("time",))
        remote = conn.recv()
        back = time.perf_counter()
        if back - sent < best[0]:
            best = (back - sent, remote - (sent + back) / 2)
    return best[1], best[0] / 2


def answer_pings(conn: Connection, clock: Callable[[], float] = time.perf_counter) -> tuple:
    """The coordinator's side of measure_offset: answer ('time',) with `clock`, until the node sends anything
    else, which is returned."""
    while True:
        message = conn.recv()
        if message != ("time",):
            return message
        conn.send(clock())


def _accept(listener: Listener, count: int, timeout_s: float) -> list[Connection]:
    """`count` authenticated connections (a peer without the key is turned away), or ClientNodesError after
    `timeout_s`."""
    accepted: list[Connection] = []
    closed = threading.Event()

    def accept() -> None:
        while len(accepted) < count and not closed.is_set():
            try:
                accepted.append(listener.accept())
            except (OSError, EOFError, AuthenticationError):
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if len(accepted) < count:
        closed.set()
        raise ClientNodesError(f"{count - len(accepted)} of {count} other client node(s) did not connect within "
                               f"{timeout_s:g} s")
    return accepted


def coordinate(run_dir: Path, target: Target, requests: Sequence[Request], keep: Callable[[RequestRecord], None],
               nodes: int, processes: int | str, key: str,
               rate: float | None = None, burstiness: float = 1.0, seed: int = 0, concurrency: int | None = None,
               duration_s: float | None = None, connect_timeout_s: float = CONNECT_TIMEOUT_S,
               started: Callable[[list], None] | None = None) -> tuple[float | None, list[NodeClock]]:
    """Node 0: the load over `nodes` client nodes (this one included), with `processes` worker processes on each
    (auto: client_size.py, on each node). Returns the busiest process's CPU share over all nodes, and each node's
    clock."""
    clock = perf_clock()
    zero = time.perf_counter() - clock()
    lock = threading.Lock()

    def keep_one(record: RequestRecord) -> None:
        with lock:
            keep(record)

    listener = Listener(("0.0.0.0", 0), authkey=key.encode())
    where = run_dir / COORDINATOR_FILE
    atomic_write_json(where, {"host": os.environ.get("DISTINFER_CLIENT_ADDR") or socket.gethostname(),
                              "port": listener.address[1], "job": job_id()})
    conns: list[Connection] = []
    host = None
    try:
        conns = _accept(listener, nodes - 1, connect_timeout_s)
        clocks = [NodeClock(0, node_name(), 0.0, 0.0)]
        for conn in conns:
            _, node, name, offset, uncertainty = answer_pings(conn)
            clocks.append(NodeClock(int(node), str(name), float(offset), float(uncertainty)))
        by_node = dict(zip((c.node for c in clocks[1:]), conns, strict=True))
        if sorted(by_node) != list(range(1, nodes)):
            raise ClientNodesError(f"client nodes {sorted(by_node)} joined; expected 1..{nodes - 1}")
        clocks.sort(key=lambda c: c.node)
        measured = warm_up(target, requests, keep_one, clock, rate, burstiness, seed, concurrency)
        shares = deal(measured, nodes, concurrency)
        for node, conn in by_node.items():
            share, users = shares[node]
            conn.send(("share", share, target, zero, users, duration_s, processes))
        host = HostShare(target, shares[0][0], keep_one, worker_processes(processes, shares[0][0]), zero,
                         shares[0][1], duration_s)
        host.start(started)
        for node, conn in by_node.items():
            if conn.recv() != ("ready",):
                raise ClientNodesError(f"client node {node} did not get ready")
        base = clock() + START_LEAD_S
        for conn in by_node.values():
            conn.send(("go", base))
        readers = [threading.Thread(target=_collect, args=(conn, clocks[node], shares[node][0], base, keep_one),
                                    daemon=True) for node, conn in by_node.items()]
        for reader in readers:
            reader.start()
        cpu = host.run(base)
        for reader in readers:
            reader.join()
        clocks[0].cpu_share, clocks[0].processes, clocks[0].requests = cpu, host.processes, len(shares[0][0])
        shares_cpu = [c.cpu_share for c in clocks if c.cpu_share is not None]
        return (max(shares_cpu) if shares_cpu else None), clocks
    finally:
        if host is not None:
            host.stop()
        for conn in conns:
            conn.close()
        listener.close()
        where.unlink(missing_ok=True)


def _collect(conn: Connection, node: NodeClock, share: list[Request], base: float,
             keep: Callable[[RequestRecord], None]) -> None:
    """A node's records until its ('done', cpu share); its unfinished requests failed if it ends before."""
    seen: set[int] = set()
    try:
        while True:
            message = conn.recv()
            if isinstance(message, tuple):  # ('done', CPU share, processes)
                node.cpu_share, node.processes = message[1], message[2]
                break
            record = RequestRecord.from_dict(message)
            seen.add(record.index)
            keep(record)
    except (EOFError, OSError) as exc:
        node.ended = f"client node {node.node} ({node.name}) ended before its share was done ({type(exc).__name__})"
        for request in share:
            if request.index not in seen:
                keep(failed_record(request, base, node.ended))
    node.requests = len(seen)


def coordinator_address(run_dir: Path, timeout_s: float) -> tuple[str, int]:
    """Where this job's coordinator listens, once it has written it (a file of an earlier job is not it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            info = json.loads((run_dir / COORDINATOR_FILE).read_text())
            if info.get("job") == job_id():
                return str(info["host"]), int(info["port"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if time.monotonic() > deadline:
            raise ClientNodesError(f"the first client node did not say where it listens ({run_dir / COORDINATOR_FILE}) "
                                   f"within {timeout_s:g} s")
        time.sleep(0.1)


def join(run_dir: Path, node: int, key: str, timeout_s: float = CONNECT_TIMEOUT_S,
         started: Callable[[list], None] | None = None) -> None:
    """Node `node` (> 0): join the coordinator, align the clock, send this node's share, report every record."""
    host, port = coordinator_address(run_dir, timeout_s)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn = Client((host, port), authkey=key.encode())
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise ClientNodesError(f"cannot reach the first client node at {host}:{port}") from None
            time.sleep(0.1)
    with conn:
        offset, uncertainty = measure_offset(conn)
        conn.send(("offset", node, node_name(), offset, uncertainty))
        _, share, target, zero, users, duration_s, processes = conn.recv()

        def send(record: RequestRecord) -> None:
            conn.send(record.to_dict())

        # coordinator's clock = perf_counter here + offset - zero = perf_counter here - (zero - offset)
        mine = HostShare(target, share, send, worker_processes(processes, share), zero - offset, users, duration_s)
        try:
            mine.start(started)
            conn.send(("ready",))
            _, base = conn.recv()
            conn.send(("done", mine.run(base), mine.processes))
        finally:
            mine.stop()
