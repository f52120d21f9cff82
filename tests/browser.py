"""Headless Chromium (Debian's package) driven over its DevTools protocol: open a page, wait for a condition in
it, read a value back. The browser runs in its own process with a throw-away profile and is stopped by PID."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

from distinfer.net import free_port


async def _evaluate(ws_url: str, until: str, result: str, timeout_s: float) -> object:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        ids = iter(range(1, 1_000_000))

        async def call(expression: str) -> object:
            message_id = next(ids)
            await ws.send_str(json.dumps({"id": message_id, "method": "Runtime.evaluate",
                                          "params": {"expression": expression, "returnByValue": True}}))
            while True:
                reply = json.loads((await ws.receive()).data)
                if reply.get("id") == message_id:
                    return reply["result"]["result"].get("value")

        deadline = time.monotonic() + timeout_s
        while not await call(until):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never made {until!r} true")
            await asyncio.sleep(0.2)
        return await call(result)


def evaluate_when(url: str, until: str, result: str, timeout_s: float = 60) -> object:
    """Open `url`, wait until the JavaScript `until` is true, and return the JavaScript `result`'s value."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="distinfer-chromium-", ignore_cleanup_errors=True) as profile:
        browser = subprocess.Popen(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                                    f"--remote-debugging-port={port}", f"--user-data-dir={profile}", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    request = urllib.request.Request(f"http://127.0.0.1:{port}/json/new?{urllib.parse.quote(url, safe=':/')}", method="PUT")
                    with urllib.request.urlopen(request, timeout=2) as response:
                        page = json.loads(response.read())
                    break
                except OSError:
                    if time.monotonic() > deadline or browser.poll() is not None:
                        raise RuntimeError("chromium did not open its DevTools port") from None
                    time.sleep(0.2)
            return asyncio.run(_evaluate(page["webSocketDebuggerUrl"], until, result, timeout_s))
        finally:  # the browser and its helper processes, by their process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(browser.pid, signal.SIGTERM)
            try:
                browser.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(browser.pid, signal.SIGKILL)
                browser.wait()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(browser.pid, signal.SIGKILL)  # helpers that outlived the main process
