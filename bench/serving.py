"""The load generator's own limits, against an endpoint that streams instantly (bench/endpoint.py).

Open loop at 200 requests/s (Poisson, 8 tokens each): how late requests leave against the schedule (p50,
p99; target p99 <= 2 ms). Closed loop with 64 users: streamed requests per second the load generator
sustains with one core to itself (target >= 500). Where the machine has two cores or more, the load
generator runs on one and the endpoint on another.

    python -m bench.serving [--rate 200] [--requests 2000] [--users 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from bench.endpoint import serve_instant
from distinfer.serving.client import Request, Target, run_load
from distinfer.serving.metrics import summarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=8)
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    with serve_instant() as server:
        if len(cores) > 1:
            os.sched_setaffinity(0, {cores[0]})
            os.sched_setaffinity(server.pid, set(cores[1:]))
        target = Target(server.url, "mock")
        requests = [Request(i, f"p{i}", "hello", args.tokens) for i in range(args.requests)]
        records = asyncio.run(run_load(target, requests, lambda r: None, rate=args.rate, seed=0))
        open_loop = summarize(records, offered_rate=args.rate)
        lag = open_loop["send_lag_s"]
        print(f"open loop, {args.rate:g} requests/s offered, {open_loop['completed']} requests: achieved "
              f"{open_loop['achieved_rate']:.1f}/s; send lag p50 {lag['p50'] * 1e3:.3f} ms, p99 {lag['p99'] * 1e3:.3f} ms"
              f" (target p99 <= 2 ms): {'met' if lag['p99'] <= 0.002 else 'NOT met'}")
        start = time.perf_counter()
        records = asyncio.run(run_load(target, requests, lambda r: None, concurrency=args.users))
        seconds = time.perf_counter() - start
        closed = summarize(records)
        per_s = closed["completed"] / seconds
        print(f"closed loop, {args.users} users, {closed['completed']} requests of {args.tokens} streamed tokens in "
              f"{seconds:.2f} s: {per_s:.0f} requests/s on one core (target >= 500): "
              f"{'met' if per_s >= 500 else 'NOT met'}; errors {closed['errors']}")


if __name__ == "__main__":
    main()
