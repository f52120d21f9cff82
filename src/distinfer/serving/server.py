"""distinfer's OpenAI-compatible server over the continuous-batching engine (FastAPI + uvicorn).

`GET /v1/models`, `POST /v1/completions` and `POST /v1/chat/completions` (streamed as server-sent events, or
whole; chat prompts through the model's chat template, serving/chat.py), `GET /health`, and `GET /metrics` in
Prometheus' text format, and at `/` a small chat page that streams each answer and shows its TTFT and tokens/s.
The HTTP layer only calls the engine: it tokenizes, checks the request (a prompt too long for the model, or a
field the engine does not do, is an HTTP 400 with a message), queues it, and turns each token the engine hands
back into a chunk; a client that goes away frees its slot.
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

from distinfer.serving.chat import chat_prompt_ids
from distinfer.serving.detokenize import IncrementalDetokenizer
from distinfer.serving.engine import ServingEngine
from distinfer.serving.protocol import ChatRequest, CompletionRequest, RequestError, parse_request

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
        return await answer(raw, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(raw: Request) -> JSONResponse | StreamingResponse:
        return await answer(raw, chat=True)

    async def answer(raw: Request, chat: bool) -> JSONResponse | StreamingResponse:
        """One request of either API: checked, tokenized, queued, and its tokens streamed or returned whole."""
        begun, path = time.perf_counter(), raw.url.path

        def refuse(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
            raw.state.refusal = message[:300]  # the log line of the refused request says why
            return _error(status, message, kind)

        try:
            body = parse_request(await raw.json(), ChatRequest if chat else CompletionRequest)
            if body.model != model_name:
                return refuse(404, f"the model {body.model!r} is not served here; this server serves {model_name!r}",
                              "not_found_error")
            if isinstance(body, ChatRequest):
                prompt_ids = chat_prompt_ids(tokenizer, body.messages)
            elif isinstance(body.prompt, str):
                prompt_ids = tokenizer(body.prompt)["input_ids"]
            else:
                prompt_ids = body.prompt
                if any(not 0 <= t < len(tokenizer) for t in prompt_ids):
                    return refuse(400, f"field 'prompt': token ids must lie in 0..{len(tokenizer) - 1}")
        except RequestError as exc:
            return refuse(400, str(exc)[:1000])
        except (ValueError, RecursionError) as exc:  # not JSON, or nested past the parser's depth
            return refuse(400, f"the request body is not JSON: {exc}"[:500])
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
        shape = ChatChunks(model_name) if chat else TextChunks(model_name)

        def usage(generated: int) -> dict:
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": generated,
                    "total_tokens": len(prompt_ids) + generated}

        def ended(generated: int, reason: str | None) -> None:
            if reason == "error":
                log.error("POST %s: the engine stopped while generating: %s", path, engine.failure)
            elif log_requests:
                log.info("POST %s 200 %s prompt %d tokens, generated %d, %s, %.1f ms", path,
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
            return JSONResponse(shape.whole(tokenizer.decode(ids, skip_special_tokens=True), ids, reason,
                                            usage(len(ids))))

        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def event(data: dict) -> bytes:
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        async def events() -> AsyncIterator[bytes]:
            detok, reason = IncrementalDetokenizer.of(tokenizer), None
            try:
                while reason is None:
                    token, reason = await queue.get()
                    if token is not None:
                        yield event(shape.chunk(detok.add(token), [token], None))
                yield event(shape.chunk(detok.flush(), [], reason))
                if include_usage:
                    yield event(shape.usage(usage(len(detok.ids))))
                yield b"data: [DONE]\n\n"
            finally:
                if reason is None:  # the client went away: free the slot
                    engine.cancel(request_id)
                ended(len(detok.ids), reason)

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


class TextChunks:
    """The completions API's objects: `text_completion` chunks with `text` (and `token_ids`), whole or streamed."""

    kind = "text_completion"

    def __init__(self, model: str) -> None:
        self.model, self.id, self.created = model, f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def _object(self, choices: list[dict], kind: str | None = None) -> dict:
        return {"id": self.id, "object": kind or self.kind, "created": self.created, "model": self.model,
                "choices": choices}

    def choice(self, text: str, ids: list[int], reason: str | None) -> dict:
        return {"index": 0, "text": text, "token_ids": ids, "finish_reason": reason, "logprobs": None}

    def chunk(self, text: str, ids: list[int], reason: str | None) -> dict:
        return self._object([self.choice(text, ids, reason)])

    def usage(self, usage: dict) -> dict:
        return {**self._object([]), "usage": usage}

    def whole(self, text: str, ids: list[int], reason: str | None, usage: dict) -> dict:
        return {**self.chunk(text, ids, reason), "usage": usage}


class ChatChunks(TextChunks):
    """The chat API's objects: `chat.completion.chunk` with a `delta` (the first one names the role), and a whole
    `chat.completion` with its `message`."""

    kind = "chat.completion.chunk"

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.id, self.first = f"chatcmpl-{uuid.uuid4().hex}", True

    def choice(self, text: str, ids: list[int], reason: str | None) -> dict:
        delta = {"role": "assistant", "content": text} if self.first else ({"content": text} if text else {})
        self.first = False
        return {"index": 0, "delta": delta, "token_ids": ids, "finish_reason": reason, "logprobs": None}

    def whole(self, text: str, ids: list[int], reason: str | None, usage: dict) -> dict:
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "token_ids": ids, "finish_reason": reason, "logprobs": None}
        return {**self._object([choice], "chat.completion"), "usage": usage}


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
        elif self.log_requests and path not in ("/v1/completions", "/v1/chat/completions"):  # those log themselves
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
