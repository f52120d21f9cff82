"""distinfer's mock server (distinfer.serving.mock) streaming instantly, in its own process on a loopback port: for
measuring the load generator, not an engine. `serve_instant` yields its URL and PID and stops it by its PID."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from distinfer.net import free_port
from distinfer.serving.runner import wait_healthy

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Served:
    url: str  # the base URL, http://127.0.0.1:<port>
    pid: int


@contextlib.contextmanager
def serve_instant(port: int | None = None, model: str = "mock", ttft_ms: float = 0.0,
                  itl_ms: float = 0.0) -> Iterator[Served]:
    """The mock server for `model` in a child process on 127.0.0.1 (instant unless `ttft_ms` / `itl_ms` say
    otherwise); yields its URL and PID; stops it by PID, also on failure."""
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "distinfer.serving.mock", "--port", str(port), "--model", model,
                             "--ttft-ms", str(ttft_ms), "--itl-ms", str(itl_ms)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc.poll, 30)
        yield Served(url, proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
