"""An offline run through a server (engine vllm): the batches the other engines run, sent as requests.

The prompts are tokenized as the offline engines tokenize them (cut from the left at max_prompt_tokens) and
sent as token-id prompts, so the server sees the same tokens. Each batch of `batch_size` prompts is sent at once
(the server decodes at most batch_size sequences together) and the next when all have finished; warm-up
batches first, then every batch `repeats` times. Token times count from the batch's start, as in the offline
engines, so the summary has the same fields and meanings; completions.jsonl comes from the first repeat and
requests.jsonl has every request's record.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from distinfer.bundle import JsonlWriter, RunBundle, atomic_write_json, read_json
from distinfer.finalize import stopped
from distinfer.metrics import LatencyReport
from distinfer.plan import RunSpec
from distinfer.serving.client import Request, Target, send
from distinfer.serving.records import RequestRecord

FINISH_REASONS = {"stop": "eos", "length": "length"}  # the server's words -> the offline engines'


def batched_requests(spec: RunSpec) -> tuple[list[str], list[list[Request]]]:
    """The run's prompts (texts, in order) and its batches of token-id requests."""
    from distinfer.models.loading import load_tokenizer
    from distinfer.runtime.worker import run_prompts

    tokenizer = load_tokenizer(Path(spec.model_path), spec.trust_remote_code)
    tokenizer.truncation_side = "left"
    limit = spec.generation.max_prompt_tokens
    prompts = run_prompts(spec)
    ids = tokenizer([p.prompt for p in prompts], truncation=limit is not None, max_length=limit)["input_ids"]
    requests = [Request(i, p.id, list(map(int, tokens)), spec.generation.max_new_tokens)
                for i, (p, tokens) in enumerate(zip(prompts, ids))]
    size = spec.batch_size
    return [p.prompt for p in prompts], [requests[i:i + size] for i in range(0, len(requests), size)]


async def measure(target: Target, spec: RunSpec, batches: list[list[Request]], latency: LatencyReport,
                  on_record: Callable[[RequestRecord], None]) -> list[RequestRecord]:
    """Warm-up, then every batch `repeats` times; the first repeat's records in prompt order."""
    start = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - start

    first: list[RequestRecord] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=target.timeout_s),
                                     connector=connector) as session:
        async def one_batch(batch: list[Request], warmup: bool) -> list[RequestRecord]:
            began = clock()
            records = [RequestRecord(r.index, r.prompt_id, began, warmup=warmup) for r in batch]
            await asyncio.gather(*(send(session, target, r, rec, clock) for r, rec in zip(batch, records)))
            for record in records:
                on_record(record)
            if not warmup:
                latency.add_batch([[t - began for t in rec.token_times_s] for rec in records if rec.ok],
                                  clock() - began)
            return records

        for _ in range(spec.warmup):
            await one_batch(batches[0], warmup=True)
        for repeat in range(spec.repeats):
            for batch in batches:
                records = await one_batch(batch, warmup=False)
                if repeat == 0:
                    first.extend(records)
    return first


def summary(spec: RunSpec, latency: LatencyReport, status: str, error: str | None, started: float,
            load_s: float | None, tokenize_s: float | None) -> dict:
    """summary.json in the offline engines' fields (no per-rank records: the server's ranks are vLLM's)."""
    return {"status": status, "error": error, **spec.summary_fields(), "perplexity": None, "perplexity_tokens": None,
            "config_hash": spec.config_hash(), **latency.summary(), "load_s": load_s, "tokenize_s": tokenize_s,
            "started_at": started, "finished_at": time.time(), "ranks": []}


def write_completions(path: Path, texts: list[str], records: list[RequestRecord]) -> None:
    writer = JsonlWriter(path)
    try:
        for record in sorted(records, key=lambda r: r.index):
            writer.write({"id": record.prompt_id, "prompt": texts[record.index],
                          "output_token_ids": record.token_ids or [], "text": record.text,
                          "finish_reason": FINISH_REASONS.get(record.finish_reason or "", record.finish_reason)})
    finally:
        writer.close()


def run(run_dir: Path, server_url: str | None = None) -> int:
    """Measure the offline run's batches on its server (started here, or by the job at `server_url`)."""
    from distinfer.serving.runner import EndpointError, own_server, started_server

    bundle = RunBundle(run_dir)
    spec = RunSpec.from_dict((read_json(bundle.run_json) or {})["run"])
    started = time.time()
    latency = LatencyReport()
    timings: dict[str, float | None] = {"load_s": None, "tokenize_s": None}
    writer = JsonlWriter(run_dir / "requests.jsonl")
    stack = contextlib.ExitStack()

    def write(status: str, error: str | None) -> None:
        atomic_write_json(bundle.summary_json, summary(spec, latency, status, error, started, timings["load_s"],
                                                       timings["tokenize_s"]))

    def stop(signum: int, _frame: object) -> None:  # scancel, Ctrl-C, or the job's time limit
        write(*stopped(signal.Signals(signum).name, os.environ, time.time()))
        stack.close()
        os._exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    try:
        t0 = time.perf_counter()
        texts, batches = batched_requests(spec)
        timings["tokenize_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        target = started_server(run_dir, spec, server_url) if server_url else stack.enter_context(
            own_server(run_dir, spec))
        timings["load_s"] = time.perf_counter() - t0
        records = asyncio.run(measure(target, spec, batches, latency, lambda r: writer.write(r.to_dict())))
    except (EndpointError, ValueError, OSError) as exc:
        write("failed", str(exc))
        return 1
    finally:
        writer.close()
        stack.close()
    write_completions(bundle.completions, texts, records)
    atomic_write_json(run_dir / "samples.json", latency.samples())
    failed = [r for r in records if not r.ok]
    error = None
    if failed:
        examples = "; ".join(sorted({r.error or f"HTTP {r.status}" for r in failed})[:3])
        error = f"{len(failed)} of {len(records)} requests failed: {examples}"
    write("failed" if failed else "ok", error)
    return 1 if failed else 0
