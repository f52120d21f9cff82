"""The load split over worker processes on one host (`scenario.client.processes`), so that one Python event loop
is never what limits the load.

The parent sends the warm-up requests itself, then draws the whole schedule (the same offsets one process would
use: schedule.py, or a trace's times) and deals the measured requests round-robin: worker k gets requests k, k+N,
k+2N, ... with their planned offsets (a closed loop: its share of the users and of the requests). Every worker
waits for one start time on CLOCK_MONOTONIC (time.perf_counter, one clock for every process of the host), sends
its share on the offsets, and hands each finished record to the parent through a queue; the parent writes them
to requests.jsonl as they come. A worker that dies (killed, crashed) loses only its unfinished requests: each is
recorded as failed, with the worker's exit named. Each worker reports the CPU share of its own process, and the
load's `client_cpu_share` is the highest.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import queue
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from distinfer.serving.client import Request, Spin, Target, busy_share, perf_clock, run_load
from distinfer.serving.records import RequestRecord
from distinfer.serving.schedule import arrival_offsets

START_LEAD_S = 0.2  # from the last worker's readiness to the schedule's start
READY_TIMEOUT_S = 120.0


def _worker(share: list[Request], target: Target, zero: float, concurrency: int | None, duration_s: float | None,
            records: multiprocessing.Queue, ready: multiprocessing.Queue, go: multiprocessing.Queue) -> None:
    """One worker: its share of the requests on the parent's clock (perf_counter - `zero`), from the start time
    the parent sends; every record, then ('done', cpu share), onto `records`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent answers it
    clock = perf_clock(zero)
    ready.put(True)
    base = go.get()
    cpu, wall, spin = time.process_time(), time.monotonic(), Spin.idle_s
    asyncio.run(run_load(target, share, lambda r: records.put(r.to_dict()), concurrency=concurrency,
                         duration_s=duration_s, clock=clock, base=base))
    records.put(("done", busy_share(cpu, wall, spin)))


def deal(measured: Sequence[Request], processes: int, rate: float | None, burstiness: float, seed: int,
         concurrency: int | None) -> list[list[Request]]:
    """The measured requests dealt round-robin over `processes`, each with its planned offset in `at_s` (open
    loop: the one-process schedule's offsets, or a trace's own times; closed loop: none, in order)."""
    if concurrency is None:
        offsets = [r.at_s for r in measured] if rate is None else arrival_offsets(len(measured), rate, burstiness,
                                                                                   seed)
        measured = [replace(r, at_s=offset) for r, offset in zip(measured, offsets, strict=True)]
    return [list(measured[k::processes]) for k in range(processes)]


def run_processes(target: Target, requests: Sequence[Request], keep: Callable[[RequestRecord], None],
                  processes: int, rate: float | None = None, burstiness: float = 1.0, seed: int = 0,
                  concurrency: int | None = None, duration_s: float | None = None,
                  started: Callable[[list[multiprocessing.Process]], None] | None = None) -> float | None:
    """Warm-up here, then the measured requests over `processes` workers; `keep` gets every record as it comes.
    Returns the highest worker CPU share (None if no worker reported). `started` gets the worker processes once
    they run (so that a signal handler can stop them)."""
    clock = perf_clock()
    zero = time.perf_counter() - clock()
    warmup = [r for r in requests if r.warmup]
    measured = [r for r in requests if not r.warmup]
    if warmup:
        asyncio.run(run_load(target, warmup, keep, rate=rate, concurrency=concurrency, clock=clock))
    shares = deal(measured, processes, rate, burstiness, seed, concurrency)
    users = [None] * processes if concurrency is None else \
        [concurrency // processes + (k < concurrency % processes) for k in range(processes)]
    context = multiprocessing.get_context("spawn")
    records, ready = context.Queue(), context.Queue()
    gos = [context.Queue() for _ in range(processes)]
    workers = [context.Process(target=_worker, args=(share, target, zero, user or None, duration_s, records, ready,
                                                      go), daemon=True, name=f"distinfer-client-{k}")
               for k, (share, user, go) in enumerate(zip(shares, users, gos, strict=True))]
    for worker in workers:
        worker.start()
    if started:
        started(workers)
    try:
        try:
            for _ in workers:
                ready.get(timeout=READY_TIMEOUT_S)
        except queue.Empty:
            raise ValueError(f"the client's worker processes did not start within {READY_TIMEOUT_S:g} s") from None
        base = clock() + START_LEAD_S
        for go in gos:
            go.put(base)
        shares_cpu: list[float] = []
        seen: set[int] = set()
        quiet = 0.1  # while workers run: a short wait, then a look at whether any is alive
        while True:
            try:
                item = records.get(timeout=quiet)
            except queue.Empty:
                if quiet > 0.1:  # all ended, and what they queued is read
                    break
                if not any(w.is_alive() for w in workers):
                    quiet = 0.2
                continue
            if isinstance(item, tuple):  # ('done', the worker's CPU share)
                shares_cpu.append(float(item[1]))
                continue
            record = RequestRecord.from_dict(item)
            seen.add(record.index)
            keep(record)
        for k, worker in enumerate(workers):
            worker.join(timeout=5)
            if worker.exitcode:
                how = f"signal {-worker.exitcode}" if worker.exitcode < 0 else f"exit status {worker.exitcode}"
                for request in shares[k]:
                    if request.index not in seen:
                        keep(RequestRecord(request.index, request.prompt_id, base + (request.at_s or 0.0),
                                           error=f"client worker process {k} ended ({how}) before this request "
                                                 "finished", planned_input_tokens=request.input_tokens,
                                           planned_output_tokens=request.max_tokens, group=request.group))
        return max(shares_cpu) if shares_cpu else None
    finally:
        stop(workers)


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
