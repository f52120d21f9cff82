"""A load sent from several client nodes (serving/client_nodes.py), here as threads and processes of this machine
against distinfer's mock server; on the real local Slurm cluster in test_slurm.py. The clock-offset measurement
is checked against a coordinator whose clock is set 5 s ahead."""

from __future__ import annotations

import statistics
import sys
import threading
import time
from multiprocessing import Pipe
from multiprocessing.connection import Client
from pathlib import Path

import pytest

from distinfer.serving.client import Request, Target
from distinfer.serving.client_nodes import (
    ClientNodesError,
    answer_pings,
    coordinate,
    coordinator_address,
    join,
    measure_offset,
)
from distinfer.serving.records import RequestRecord
from distinfer.serving.schedule import arrival_offsets

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.endpoint import serve_instant  # noqa: E402

KEY = "a-job-key"


@pytest.fixture(autouse=True)
def job(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("SLURM_JOB_ID", "4242")


def requests(count: int, warmup: int = 1) -> list[Request]:
    return [Request(i, f"p{i}", "a prompt", 4, warmup=i < warmup) for i in range(count + warmup)]


def test_the_offset_of_a_clock_5_s_ahead_is_found_within_its_uncertainty() -> None:
    ours, theirs = Pipe()
    ahead = threading.Thread(target=answer_pings, args=(theirs, lambda: time.perf_counter() + 5.0), daemon=True)
    ahead.start()
    offset, uncertainty = measure_offset(ours)
    ours.send(("offset",))
    ahead.join(5)
    assert 0 < uncertainty < 0.005
    assert abs(offset - 5.0) <= uncertainty + 1e-6, (offset, uncertainty)


def test_two_client_nodes_send_the_schedule_of_one_on_one_clock(tmp_path: Path) -> None:
    """Node 1 joins as a thread: every planned request is sent once, each node its half, at the one-process
    schedule's offsets from one start, and on time."""
    records: list[RequestRecord] = []
    with serve_instant() as server:
        node = threading.Thread(target=join, args=(tmp_path, 1, KEY), daemon=True)
        node.start()
        cpu, clocks = coordinate(tmp_path, Target(server.url, "mock"), requests(40), records.append, 2, 1, KEY,
                                 rate=50.0, seed=3)
        node.join(10)
    measured = sorted((r for r in records if not r.warmup), key=lambda r: r.index)
    assert [r.index for r in measured] == list(range(1, 41)) and all(r.ok for r in records)
    start = measured[0].planned_s
    planned = arrival_offsets(40, 50.0, 1.0, 3)
    assert [round(r.planned_s - start, 9) for r in measured] == [round(p, 9) for p in planned]
    lags = [r.sent_s - r.planned_s for r in measured]
    assert statistics.median(lags) < 0.02 and min(lags) > -0.002, lags
    assert [(c.node, c.requests) for c in clocks] == [(0, 20), (1, 20)]
    assert clocks[1].uncertainty_s < 0.005 and abs(clocks[1].offset_s) <= clocks[1].uncertainty_s + 1e-4, clocks
    assert cpu is not None and 0 < cpu < 1
    assert not (tmp_path / "client-nodes.json").exists(), "the coordinator's address is removed after the load"


def test_a_client_node_that_ends_early_loses_only_its_unfinished_requests(tmp_path: Path) -> None:
    """A node that sends two records of its share and hangs up: those two stay, the rest of its share is recorded
    as failed naming the node, and node 0's share all succeeds."""
    records: list[RequestRecord] = []

    def quitter() -> None:
        host, port = coordinator_address(tmp_path, 30)
        with Client((host, port), authkey=KEY.encode()) as conn:
            offset, uncertainty = measure_offset(conn, 4)
            conn.send(("offset", 1, "quitter", offset, uncertainty))
            _, share, *_ = conn.recv()
            conn.send(("ready",))
            _, base = conn.recv()
            for request in share[:2]:
                conn.send(RequestRecord(request.index, request.prompt_id, base + request.at_s, sent_s=base,
                                        token_times_s=[base], end_s=base, output_tokens=1, status=200).to_dict())

    with serve_instant() as server:
        node = threading.Thread(target=quitter, daemon=True)
        node.start()
        _, clocks = coordinate(tmp_path, Target(server.url, "mock"), requests(20, 0), records.append, 2, 1, KEY,
                               rate=100.0)
        node.join(10)
    assert sorted(r.index for r in records) == list(range(20))
    failed = [r for r in records if not r.ok]
    assert len(failed) == 8 and {r.index % 2 for r in failed} == {1}
    assert all("client node 1 (quitter) ended before its share was done" in r.error for r in failed)
    assert clocks[1].ended and clocks[1].requests == 2


def test_a_peer_without_the_jobs_key_is_turned_away(tmp_path: Path) -> None:
    refused: list[BaseException] = []

    def intruder() -> None:
        host, port = coordinator_address(tmp_path, 30)
        try:
            Client((host, port), authkey=b"not the key")
        except Exception as exc:  # multiprocessing's AuthenticationError
            refused.append(exc)

    thread = threading.Thread(target=intruder, daemon=True)
    thread.start()
    with pytest.raises(ClientNodesError, match="1 of 1 other client node"):
        coordinate(tmp_path, Target("http://127.0.0.1:9", "mock"), requests(4), lambda r: None, 2, 1, KEY,
                   rate=10.0, connect_timeout_s=1.0)
    thread.join(5)
    assert refused and "digest" in str(refused[0]), refused
