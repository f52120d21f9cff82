"""A streaming OpenAI-compatible server with no model: answers at set times, so that the client is what is measured.

`POST /v1/completions` and `POST /v1/chat/completions`, streamed (`stream: true`, server-sent events as vLLM
sends them, a usage chunk where `stream_options.include_usage` asks, then `[DONE]`) or whole: `max_tokens`
(`max_completion_tokens` for chat; default 16) tokens, the first after `ttft_ms`, each next `itl_ms` later (0:
at once). Token i is the text " t<i>" with id i (`token_ids` in each completions chunk). Prompt tokens are
counted as the prompt's token ids, or its whitespace-separated words for text (messages: their contents').
`GET /health`, `GET /v1/models` (the one model it serves), `GET /metrics` (requests and tokens sent, Prometheus
text). `POST /mock/stall {"seconds": S}` holds every token not yet written for S seconds from now: a server
stall on demand. A prompt "fail" is answered with HTTP 400; a body that is not a request object, an unknown
model, or a length outside 1..MAX_TOKENS with 400 naming the field.

    distinfer mock-server --port 8100 --ttft-ms 20 --itl-ms 5
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from aiohttp import web

MAX_TOKENS = 65_536
MAX_STALL_S = 3600.0


@dataclass
class Timing:
    ttft_s: float = 0.0
    itl_s: float = 0.0
    stalled_until: float = 0.0  # time.monotonic() before which no token is written


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error"}}, status=status)


def _prompt_tokens(body: dict, chat: bool) -> int:
    if chat:
        messages = body.get("messages")
        texts = [m.get("content") for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
        return sum(len(t.split()) if isinstance(t, str) else 1 for t in texts)
    prompt = body.get("prompt")
    return len(prompt) if isinstance(prompt, list) else len(str(prompt).split())


def app(model: str = "mock", ttft_ms: float = 0.0, itl_ms: float = 0.0) -> web.Application:
    timing = Timing(ttft_ms / 1e3, itl_ms / 1e3)
    counters = {"requests": 0, "tokens": 0}

    async def hold(until: float) -> None:
        """Wait until `until` (time.monotonic()) and past any stall."""
        while True:
            wait = max(until, timing.stalled_until) - time.monotonic()
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": model, "object": "model", "owned_by": "mock"}]})

    async def metrics(_request: web.Request) -> web.Response:
        lines = [f"# TYPE mock_{name}_total counter\nmock_{name}_total {value}" for name, value in counters.items()]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def stall(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            seconds = float(body["seconds"])
        except (ValueError, KeyError, TypeError):
            return _error(400, 'field "seconds": a number of seconds is required')
        if not 0 <= seconds <= MAX_STALL_S:
            return _error(400, f'field "seconds": 0..{MAX_STALL_S:g}')
        timing.stalled_until = time.monotonic() + seconds
        return web.json_response({"stalled_s": seconds})

    async def answer(request: web.Request, chat: bool) -> web.StreamResponse:
        begun = time.monotonic()
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _error(400, "the body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "the body is not a request object")
        if body.get("model") not in (None, model):
            return _error(404, f"the model {body.get('model')!r} is not served here; this server serves {model!r}")
        if not chat and body.get("prompt") == "fail":
            return _error(400, "bad prompt")
        field = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
        tokens = body.get(field, 16)
        if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= MAX_TOKENS:
            return _error(400, f"field {field!r}: an integer 1..{MAX_TOKENS}")
        counters["requests"] += 1
        counters["tokens"] += tokens
        prompt_tokens = _prompt_tokens(body, chat)
        kind = "chat.completion" if chat else "text_completion"

        def choice(i: int) -> dict:
            last = i == tokens - 1
            if chat:
                return {"index": 0, "delta": {"content": f" t{i}"}, "finish_reason": "length" if last else None}
            return {"index": 0, "text": f" t{i}", "token_ids": [i], "finish_reason": "length" if last else None}

        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens}
        if not body.get("stream"):
            await hold(begun + timing.ttft_s + timing.itl_s * (tokens - 1))
            text = "".join(f" t{i}" for i in range(tokens))
            whole = {"index": 0, "finish_reason": "length",
                     **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
            return web.json_response({"id": "mock", "object": kind, "model": model, "choices": [whole],
                                      "usage": usage})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        for i in range(tokens):
            await hold(begun + timing.ttft_s + timing.itl_s * i)
            chunk = {"id": "mock", "object": chunk_kind, "model": model, "choices": [choice(i)]}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage"):
            final = {"id": "mock", "object": chunk_kind, "model": model, "choices": [], "usage": usage}
            await response.write(b"data: " + json.dumps(final).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def completions(request: web.Request) -> web.StreamResponse:
        return await answer(request, chat=False)

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await answer(request, chat=True)

    application = web.Application(client_max_size=64 << 20)
    application.router.add_get("/health", health)
    application.router.add_get("/v1/models", models)
    application.router.add_get("/metrics", metrics)
    application.router.add_post("/mock/stall", stall)
    application.router.add_post("/v1/completions", completions)
    application.router.add_post("/v1/chat/completions", chat_completions)
    return application


def run(host: str, port: int, model: str = "mock", ttft_ms: float = 0.0, itl_ms: float = 0.0) -> None:
    """Serve until SIGTERM or Ctrl-C."""
    web.run_app(app(model, ttft_ms, itl_ms), host=host, port=port, print=None, access_log=None)


def main() -> None:
    """`python -m distinfer.serving.mock --port P [--ttft-ms T] [--itl-ms I] [--model NAME]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m distinfer.serving.mock", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="mock")
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--itl-ms", type=float, default=0.0)
    args = parser.parse_args()
    run(args.host, args.port, args.model, args.ttft_ms, args.itl_ms)


if __name__ == "__main__":
    main()
