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
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from distinfer.runtime.sampling import SamplingParams
from distinfer.serving.engine import ServingEngine


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    prompt: str | list[int]
    max_tokens: int = Field(16, ge=1)
    stream: bool = False
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)
    seed: int | None = None
    ignore_eos: bool = False
    n: int = 1
    stream_options: dict | None = None


CHAT_PAGE = Path(__file__).resolve().parent / "static" / "chat.html"  # the quick look: plain HTML and JavaScript
UNSUPPORTED = ("echo", "logprobs", "best_of", "suffix", "logit_bias")


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


class _Detokenizer:
    """Text of each new token: the decoded whole minus what was already sent (multi-byte characters whole)."""

    def __init__(self, tokenizer) -> None:  # noqa: ANN001
        self.tokenizer, self.ids, self.sent = tokenizer, [], ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete character: wait for its next byte
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece


def create_app(engine: ServingEngine, tokenizer, model_name: str,  # noqa: ANN001, C901
               facts: dict | None = None) -> FastAPI:
    """The OpenAI-compatible app over `engine`; `facts` (the device and host it serves from) answer GET /version
    beside distinfer's version, as vLLM's server answers its own."""
    from distinfer import __version__

    app = FastAPI(title="distinfer", docs_url=None, redoc_url=None)
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
            lines += [f"# HELP distinfer_{name} {about}", f"# TYPE distinfer_{name} {kind}",
                      f"distinfer_{name} {value}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions", response_model=None)
    async def completions(raw: Request) -> JSONResponse | StreamingResponse:
        try:
            body = CompletionRequest.model_validate(await raw.json())
        except Exception as exc:  # noqa: BLE001 - any malformed body is the client's
            return _error(400, f"malformed request: {exc}".splitlines()[0][:500])
        if body.model != model_name:
            return _error(404, f"the model {body.model!r} is not served here; this server serves {model_name!r}",
                          "not_found_error")
        unsupported = [name for name in UNSUPPORTED if (body.model_extra or {}).get(name)]
        if body.n != 1 or unsupported:
            return _error(400, f"not supported by distinfer's server: {', '.join(unsupported) or 'n > 1'}")
        if isinstance(body.prompt, str):
            prompt_ids = tokenizer(body.prompt)["input_ids"]
        else:
            prompt_ids = body.prompt
            if any(not 0 <= t < len(tokenizer) for t in prompt_ids):
                return _error(400, f"token ids must lie in 0..{len(tokenizer) - 1}")
        sampling = SamplingParams(greedy=body.temperature == 0, temperature=body.temperature or 1.0,
                                  top_k=max(0, body.top_k), top_p=body.top_p,
                                  seed=body.seed if body.seed is not None else int(uuid.uuid4().int % 2**31))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(token: int | None, reason: str | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (token, reason))

        try:
            request_id = engine.submit(prompt_ids, body.max_tokens, emit, body.ignore_eos, sampling)
        except ValueError as exc:
            return _error(400, str(exc))
        except RuntimeError as exc:  # the engine stopped (a stage went away)
            return _error(503, str(exc), "server_error")
        completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, ids: list[int], reason: str | None, usage: dict | None = None) -> dict:
            return {"id": completion_id, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [] if usage else [{"index": 0, "text": text, "token_ids": ids,
                                                  "finish_reason": reason, "logprobs": None}],
                    **({"usage": usage} if usage else {})}

        def usage(generated: int) -> dict:
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": generated,
                    "total_tokens": len(prompt_ids) + generated}

        if not body.stream:
            detok, reason = _Detokenizer(tokenizer), None
            try:
                while reason is None:
                    token, reason = await queue.get()
                    if token is not None:
                        detok.add(token)
            finally:
                if reason is None:
                    engine.cancel(request_id)
            if reason == "error":
                return _error(500, f"the engine stopped while generating: {engine.failure}", "server_error")
            whole = chunk(tokenizer.decode(detok.ids, skip_special_tokens=True), detok.ids, reason)
            return JSONResponse({**whole, "usage": usage(len(detok.ids))})

        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def events() -> AsyncIterator[bytes]:
            detok, reason = _Detokenizer(tokenizer), None
            try:
                while reason is None:
                    token, reason = await queue.get()
                    if token is not None:
                        yield b"data: " + json.dumps(chunk(detok.add(token), [token], None)).encode() + b"\n\n"
                yield b"data: " + json.dumps(chunk("", [], reason)).encode() + b"\n\n"
                if include_usage:
                    yield b"data: " + json.dumps(chunk("", [], None, usage(len(detok.ids)))).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
            finally:
                if reason is None:  # the client went away: free the slot
                    engine.cancel(request_id)

        return StreamingResponse(events(), media_type="text/event-stream")

    return app
