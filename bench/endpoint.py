"""An OpenAI-compatible endpoint that streams instantly: for measuring the load generator, not an engine.

`POST /v1/completions` with `stream: true` answers `max_tokens` chunks of one token each at once (text
" t<i>", token id i), then a usage chunk and `[DONE]`; `GET /health` answers 200; a request whose prompt is
"fail" gets HTTP 400. Runs in its own process on a loopback port (`serve_instant`), stopped by its PID.

    python -m bench.endpoint --port 8199
"""

from __future__ import annotations

import argparse
import contextlib
import json
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


def app():  # noqa: ANN201 - aiohttp's Application
    from aiohttp import web

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("prompt") == "fail":
            return web.json_response({"error": {"message": "bad prompt"}}, status=400)
        tokens = int(body.get("max_tokens", 16))
        prompt = body.get("prompt")
        prompt_tokens = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunks = []
        for i in range(tokens):
            choice = {"index": 0, "text": f" t{i}", "token_ids": [i],
                      "finish_reason": "length" if i == tokens - 1 else None}
            chunks.append(b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n")
        usage = {"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens}}
        chunks.append(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
        for chunk in chunks:
            await response.write(chunk)
        await response.write_eof()
        return response

    application = web.Application()
    application.router.add_get("/health", health)
    application.router.add_post("/v1/completions", completions)
    return application


@dataclass(frozen=True)
class Served:
    url: str  # the base URL, http://127.0.0.1:<port>
    pid: int


@contextlib.contextmanager
def serve_instant(port: int | None = None) -> Iterator[Served]:
    """The endpoint in a child process on 127.0.0.1; yields its URL and PID; stops it by PID, also on failure."""
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.endpoint", "--port", str(port)], cwd=REPO,
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


def main() -> None:
    from aiohttp import web

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(app(), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
