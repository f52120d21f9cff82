"""distinfer's OpenAI-compatible server over the continuous-batching engine (FastAPI + uvicorn).

`GET /v1/models`, `POST /v1/completions` (streamed as server-sent events, or whole), `GET /health`, and
`GET /metrics` in Prometheus' text format, and at `/` a small chat page that streams each answer and shows its
TTFT and tokens/s. The HTTP layer only calls the engine: it tokenizes, checks the
request (a prompt too long for the model, or a field the engine does not do, is an HTTP 400 with a message),
queues it, and turns each token the engine hands back into a chunk; a client that goes away frees its slot.
Streamed chunks carry the token ids too (`token_ids`, as vLLM's `return_token_ids`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse

from distinfer.serving.detokenize import IncrementalDetokenizer
from distinfer.serving.engine import ServingEngine
from distinfer.serving.protocol import RequestError, parse_request

CHAT_PAGE = Path(__file__).resolve().parent / "static" / "chat.html"  # the quick look: plain HTML and JavaScript
STATS_EVERY_S = 10.0  # a busy server logs its throughput this often
log = logging.getLogger("distinfer.server")


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def create_app(engine: ServingEngine, tokenizer, model_name: str,  # noqa: ANN001, C901
               facts: dict | None = None, api_key: str | None = None, log_requests: bool = False) -> FastAPI:
    """The OpenAI-compatible app over `engine`; `facts` (the device and host it serves from, the tokenizer's
    folder) answer GET /version beside distinfer's version, as vLLM's server answers its own. With `api_key`,
    every /v1 path asks for `Authorization: Bearer KEY` (401 without it), as `vllm serve --api-key` does; the
    health, version and metrics paths stay open. Refused and failed requests are logged, each as one line;
    with `log_requests` every request is."""
    from distinfer import __version__

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        stats = asyncio.get_running_loop().create_task(_log_stats(engine))
        try:
            yield
        finally:
            stats.cancel()
            s = engine.stats
            log.info("shutting down: %d requests (%d finished, %d cancelled), %d tokens generated, %d waiting or "
                     "running", s.requests_total, s.requests_finished, s.requests_cancelled,
                     s.generated_tokens_total, s.waiting + s.running)

    app = FastAPI(title="distinfer", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.add_middleware(_GuardAndLog, expected=f"Bearer {api_key}".encode() if api_key else None,
                       log_requests=log_requests)
    started = int(time.time())
    version = {"version": __version__, "engine": "distinfer", **(facts or {})}

    @app.get("/", response_class=HTMLResponse)
    async def chat() -> HTMLResponse:
        return HTMLResponse(CHAT_PAGE.read_text())

    @app.get("/health")
    async def health() -> PlainTextResponse:
        if engine.failure is not None:
            return PlainTextResponse(f"engine stopped: {engine.failure}", status_code=503)
        return PlainTextResponse("ok")

    @app.get("/version")
    async def version_info() -> dict:
        return version

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "distinfer"}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(_prometheus(engine), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions", response_model=None)
    async def completions(raw: Request) -> JSONResponse | StreamingResponse:
        begun = time.perf_counter()

        def refuse(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
            raw.state.refusal = message[:300]  # the log line of the refused request says why
            return _error(status, message, kind)

        try:
            body = parse_request(await raw.json())
        except RequestError as exc:
            return refuse(400, str(exc)[:1000])
        except (ValueError, RecursionError) as exc:  # not JSON, or nested past the parser's depth
            return refuse(400, f"the request body is not JSON: {exc}"[:500])
        if body.model != model_name:
            return refuse(404, f"the model {body.model!r} is not served here; this server serves {model_name!r}",
                          "not_found_error")
        if isinstance(body.prompt, str):
            prompt_ids = tokenizer(body.prompt)["input_ids"]
        else:
            prompt_ids = body.prompt
            if any(not 0 <= t < len(tokenizer) for t in prompt_ids):
                return refuse(400, f"field 'prompt': token ids must lie in 0..{len(tokenizer) - 1}")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(token: int | None, reason: str | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (token, reason))

        try:
            request_id = engine.submit(prompt_ids, body.new_tokens, emit, body.ignore_eos,
                                       body.sampling(uuid.uuid4().int % 2**31))
        except ValueError as exc:
            return refuse(400, str(exc))
        except RuntimeError as exc:  # the engine stopped (a stage went away)
            return refuse(503, str(exc), "server_error")
        completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, ids: list[int], reason: str | None, usage: dict | None = None) -> dict:
            return {"id": completion_id, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [] if usage else [{"index": 0, "text": text, "token_ids": ids,
                                                  "finish_reason": reason, "logprobs": None}],
                    **({"usage": usage} if usage else {})}

        def usage(generated: int) -> dict:
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": generated,
                    "total_tokens": len(prompt_ids) + generated}

        def ended(generated: int, reason: str | None) -> None:
            if reason == "error":
                log.error("POST /v1/completions: the engine stopped while generating: %s", engine.failure)
            elif log_requests:
                log.info("POST /v1/completions 200 %s prompt %d tokens, generated %d, %s, %.1f ms",
                         "stream" if body.stream else "whole", len(prompt_ids), generated, reason or "client gone",
                         (time.perf_counter() - begun) * 1e3)

        if not body.stream:
            ids: list[int] = []
            reason = None
            try:
                while reason is None:
                    token, reason = await queue.get()
                    if token is not None:
                        ids.append(token)
            finally:
                if reason is None:
                    engine.cancel(request_id)
                ended(len(ids), reason)
            if reason == "error":
                return refuse(500, f"the engine stopped while generating: {engine.failure}", "server_error")
            whole = chunk(tokenizer.decode(ids, skip_special_tokens=True), ids, reason)
            return JSONResponse({**whole, "usage": usage(len(ids))})

        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def events() -> AsyncIterator[bytes]:
            detok, reason = IncrementalDetokenizer.of(tokenizer), None
            try:
                while reason is None:
                    token, reason = await queue.get()
                    if token is not None:
                        yield b"data: " + json.dumps(chunk(detok.add(token), [token], None)).encode() + b"\n\n"
                yield b"data: " + json.dumps(chunk(detok.flush(), [], reason)).encode() + b"\n\n"
                if include_usage:
                    yield b"data: " + json.dumps(chunk("", [], None, usage(len(detok.ids)))).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
            finally:
                if reason is None:  # the client went away: free the slot
                    engine.cancel(request_id)
                ended(len(detok.ids), reason)

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


class _GuardAndLog:
    """Plain ASGI middleware (no extra task or stream per request, as Starlette's BaseHTTPMiddleware adds to
    every streamed chunk): the API key of /v1 paths, and one log line per refused or failed request (with the
    reason the handler left in the request's state), or per request with `log_requests`."""

    def __init__(self, app, expected: bytes | None, log_requests: bool) -> None:  # noqa: ANN001 - an ASGI app
        self.app, self.expected, self.log_requests = app, expected, log_requests

    async def __call__(self, scope: dict, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        begun, path, method = time.perf_counter(), scope["path"], scope["method"]
        peer = "{}:{}".format(*scope["client"]) if scope.get("client") else "?"
        if self.expected is not None and path.startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                log.warning("%s %s 401 (no valid API key) from %s", method, path, peer)
                response = _error(401, "a valid API key is needed (Authorization: Bearer KEY)", "authentication_error")
                await response(scope, receive, send)
                return
        status = 0

        async def sending(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, sending)
        elapsed_ms = (time.perf_counter() - begun) * 1e3
        if status >= 400:
            reason = (scope.get("state") or {}).get("refusal", "")
            log.warning("%s %s %d %.1f ms from %s%s", method, path, status, elapsed_ms, peer,
                        f": {reason}" if reason else "")
        elif self.log_requests and path != "/v1/completions":  # a completion logs itself when its answer ends
            log.info("%s %s %d %.1f ms", method, path, status, elapsed_ms)


def _prometheus(engine: ServingEngine) -> str:
    s = engine.stats
    lines = []
    for name, value, kind, about in (
        ("requests_total", s.requests_total, "counter", "requests received"),
        ("requests_finished_total", s.requests_finished, "counter", "requests that ended normally"),
        ("requests_cancelled_total", s.requests_cancelled, "counter", "requests whose client went away"),
        ("generated_tokens_total", s.generated_tokens_total, "counter", "tokens generated"),
        ("prompt_tokens_total", s.prompt_tokens_total, "counter", "prompt tokens received"),
        ("engine_steps_total", s.steps_total, "counter", "group steps (one decode for its rows, prefills joining)"),
        ("groups_in_flight_max", s.groups_in_flight_max, "gauge", "most groups in the pipeline at once"),
        ("requests_running", s.running, "gauge", "requests in the running batch"),
        ("requests_waiting", s.waiting, "gauge", "requests waiting to join"),
    ):
        lines += [f"# HELP distinfer_{name} {about}", f"# TYPE distinfer_{name} {kind}", f"distinfer_{name} {value}"]
    return "\n".join(lines) + "\n"


async def _log_stats(engine: ServingEngine) -> None:
    """Every STATS_EVERY_S while the server is busy: requests and tokens per second, running and waiting."""
    s = engine.stats
    last = (s.requests_total, s.prompt_tokens_total, s.generated_tokens_total)
    while True:
        await asyncio.sleep(STATS_EVERY_S)
        now = (s.requests_total, s.prompt_tokens_total, s.generated_tokens_total)
        if now != last or s.running or s.waiting:
            log.info("last %.0f s: %.1f requests/s, prompt %.1f tokens/s, generated %.1f tokens/s; running %d, "
                     "waiting %d", STATS_EVERY_S, *((b - a) / STATS_EVERY_S for a, b in zip(last, now)), s.running,
                     s.waiting)
        last = now
