"""The load split over worker processes on one host (`scenario.client.processes`), so that one Python event loop
is never what limits the load.

The run sends the warm-up requests itself, then draws the whole schedule (the same offsets one process would
use: schedule.py, or a trace's times) and deals the measured requests round-robin: worker k gets requests k, k+N,
k+2N, ... with their planned offsets (a closed loop: its share of the users and of the requests). Every worker
waits for one start time on CLOCK_MONOTONIC (time.perf_counter, one clock for every process of the host), sends
its share on the offsets, and hands each finished record to the run through its own pipe; the run writes them to
requests.jsonl as they come. A worker that dies (killed, crashed) loses only its unfinished requests: each is
recorded as failed, with the worker's exit named. Each worker reports the CPU share of its own process, and the
load's `client_cpu_share` is the highest. A host's share of a load sent from several nodes (client_nodes.py)
goes the same way: `HostShare` is one host's part, in this process or over its workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from multiprocessing.connection import Connection, wait

from distinfer.serving.client import Request, Spin, Target, busy_share, perf_clock, run_load
from distinfer.serving.records import RequestRecord
from distinfer.serving.schedule import planned_offsets

START_LEAD_S = 0.2  # from the last worker's readiness to the schedule's start
READY_TIMEOUT_S = 120.0


def _worker(share: list[Request], target: Target, zero: float, concurrency: int | None, duration_s: float | None,
            conn: Connection) -> None:
    """One worker: 'ready' on `conn`, then its share of the requests on the run's clock (perf_counter - `zero`)
    from the start time the run sends back; each record as it finishes, then ('done', cpu share). A record is
    written to the pipe by the event loop's own thread (a queue's feeder thread would take the interpreter lock
    from the loop at the moments it sends)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the run answers it
    clock = perf_clock(zero)
    conn.send("ready")
    base = conn.recv()
    cpu, wall, spin = time.process_time(), time.monotonic(), Spin.idle_s
    asyncio.run(run_load(target, share, lambda r: conn.send(r.to_dict()), concurrency=concurrency,
                         duration_s=duration_s, clock=clock, base=base))
    conn.send(("done", busy_share(cpu, wall, spin)))


def timed(measured: Sequence[Request], rate: float | None, burstiness: float, seed: int,
          concurrency: int | None) -> list[Request]:
    """The measured requests, each with its planned offset in `at_s` (open loop: the one-process schedule's
    offsets, or a trace's own times; closed loop: as they are)."""
    if concurrency is not None:
        return list(measured)
    offsets = planned_offsets([r.at_s for r in measured], rate, burstiness, seed)
    return [replace(r, at_s=offset) for r, offset in zip(measured, offsets, strict=True)]


def warm_up(target: Target, requests: Sequence[Request], keep: Callable[[RequestRecord], None],
            clock: Callable[[], float], rate: float | None, burstiness: float, seed: int,
            concurrency: int | None) -> list[Request]:
    """Send the warm-up requests from here, one by one; the measured ones, each with its planned offset (`timed`),
    for the processes or nodes that send them."""
    warmup = [r for r in requests if r.warmup]
    if warmup:
        asyncio.run(run_load(target, warmup, keep, rate=rate, concurrency=concurrency, clock=clock))
    return timed([r for r in requests if not r.warmup], rate, burstiness, seed, concurrency)


def deal(requests: Sequence[Request], parts: int, users: int | None) -> list[tuple[list[Request], int | None]]:
    """Round-robin shares of `requests` over `parts`, each with its users of a closed loop (None: open loop)."""
    return [(list(requests[k::parts]), None if users is None else users // parts + (k < users % parts))
            for k in range(parts)]


def failed_record(request: Request, base: float, why: str) -> RequestRecord:
    """The record of a request whose sender ended before it finished."""
    return RequestRecord(request.index, request.prompt_id, base + (request.at_s or 0.0), error=why,
                         planned_input_tokens=request.input_tokens, planned_output_tokens=request.max_tokens,
                         group=request.group)


class HostShare:
    """One host's share of the measured requests (each with its `at_s`, open loop; or `users`, closed loop), sent
    by `processes` workers, or by this process for one, on the clock perf_counter - `zero`. `start` brings the
    workers up; `run(base)` sends from `base` on that clock, gives every record to `keep` and returns the
    busiest process's CPU share; `stop` ends what is left."""

    def __init__(self, target: Target, share: Sequence[Request], keep: Callable[[RequestRecord], None],
                 processes: int, zero: float, users: int | None, duration_s: float | None) -> None:
        self.target, self.keep, self.zero, self.duration_s = target, keep, zero, duration_s
        self.share, self.users = list(share), users
        self.parts = deal(self.share, processes, users) if processes > 1 else []
        self.processes = max(1, len(self.parts))
        self.workers: list[multiprocessing.Process] = []

    def start(self, started: Callable[[list[multiprocessing.Process]], None] | None = None) -> bool:
        """Start the workers (none for one process), hand them to `started` (so that a signal handler can stop
        them), and wait until each is ready; whether there are any."""
        if not self.parts:
            return False
        context = multiprocessing.get_context("spawn")
        ends = [context.Pipe() for _ in self.parts]
        self.conns = [ours for ours, _ in ends]
        self.workers = [context.Process(target=_worker, args=(part, self.target, self.zero, users or None,
                                                              self.duration_s, theirs),
                                        daemon=True, name=f"distinfer-client-{k}")
                        for k, ((part, users), (_, theirs)) in enumerate(zip(self.parts, ends, strict=True))]
        for worker in self.workers:
            worker.start()
        for _, theirs in ends:
            theirs.close()  # the worker's end lives in the worker alone: its exit reads as end of file here
        if started:
            started(self.workers)
        for k, conn in enumerate(self.conns):
            if not conn.poll(READY_TIMEOUT_S):
                raise ValueError(f"the client's worker processes did not start within {READY_TIMEOUT_S:g} s")
            try:
                conn.recv()
            except EOFError:
                raise ValueError(f"client worker process {k} ended as it started "
                                 f"(exit status {self.workers[k].exitcode})") from None
        return True

    def run(self, base: float) -> float | None:
        clock = perf_clock(self.zero)
        if not self.parts:
            cpu, wall, spin = time.process_time(), time.monotonic(), Spin.idle_s
            asyncio.run(run_load(self.target, self.share, self.keep, concurrency=self.users,
                                 duration_s=self.duration_s, clock=clock, base=base))
            return busy_share(cpu, wall, spin)
        for conn in self.conns:
            conn.send(base)
        shares_cpu: list[float] = []
        seen: set[int] = set()
        open_conns = {conn: k for k, conn in enumerate(self.conns)}
        done: set[int] = set()  # workers that said 'done'
        while open_conns:
            for conn in wait(list(open_conns)):
                k = open_conns[conn]  # type: ignore[index]
                try:
                    item = conn.recv()  # type: ignore[union-attr]
                except (EOFError, OSError):  # the worker has ended
                    del open_conns[conn]  # type: ignore[arg-type]
                    continue
                if isinstance(item, tuple):  # ('done', the worker's CPU share)
                    shares_cpu.append(float(item[1]))
                    done.add(k)
                    continue
                record = RequestRecord.from_dict(item)
                seen.add(record.index)
                self.keep(record)
        for k, worker in enumerate(self.workers):
            worker.join(timeout=5)
            if k not in done or worker.exitcode:
                code = worker.exitcode
                how = "still running" if code is None else f"signal {-code}" if code < 0 else f"exit status {code}"
                for request in self.parts[k][0]:
                    if request.index not in seen:
                        self.keep(failed_record(request, base, f"client worker process {k} ended ({how}) before "
                                                               "this request finished"))
        return max(shares_cpu) if shares_cpu else None

    def stop(self) -> None:
        stop(self.workers)


def run_processes(target: Target, requests: Sequence[Request], keep: Callable[[RequestRecord], None],
                  processes: int, rate: float | None = None, burstiness: float = 1.0, seed: int = 0,
                  concurrency: int | None = None, duration_s: float | None = None,
                  started: Callable[[list[multiprocessing.Process]], None] | None = None) -> float | None:
    """Warm-up here, then the measured requests over `processes` workers (this process for one); `keep` gets
    every record as it comes. Returns the busiest process's CPU share (None if no worker reported). `started`
    gets the worker processes once they run (so that a signal handler can stop them)."""
    clock = perf_clock()
    zero = time.perf_counter() - clock()
    measured = warm_up(target, requests, keep, clock, rate, burstiness, seed, concurrency)
    host = HostShare(target, measured, keep, processes, zero, concurrency, duration_s)
    try:
        lead = START_LEAD_S if host.start(started) else 0.0  # the workers are ready: the schedule starts soon after
        return host.run(clock() + lead)
    finally:
        host.stop()


def stop(workers: list[multiprocessing.Process]) -> None:
    """SIGTERM to the workers still running, SIGKILL to those that outlive 5 s."""
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
    for worker in workers:
        worker.join(timeout=5)
        if worker.is_alive():
            with contextlib.suppress(OSError):
                worker.kill()
            worker.join()
