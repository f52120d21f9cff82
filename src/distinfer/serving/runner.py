"""A serving run's process: `python -m distinfer.serving RUN_DIR` loads the endpoint as run.json says, or
distinfer's own server for the run's layout, which it starts (server.log), waits for, and stops.

Checks that the endpoint answers (a clear error within seconds if it does not), sends the scenario's
requests, appends each finished request to requests.jsonl, and writes summary.json last: `ok` when every
measured request succeeded, else `failed` with the count and examples (the figures of those that succeeded
stay). SIGTERM or Ctrl-C writes `cancelled` with what was measured so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp

from distinfer.bundle import JsonlWriter, RunBundle, atomic_write_json, read_json
from distinfer.engines import capabilities
from distinfer.finalize import stopped
from distinfer.net import free_port
from distinfer.plan import RunSpec
from distinfer.serving.client import Spin, Target, busy_share, run_load
from distinfer.serving.client_nodes import ClientNodesError, NodeClock, coordinate, join
from distinfer.serving.client_size import worker_processes
from distinfer.serving.metrics import summarize, validity
from distinfer.serving.records import RequestRecord
from distinfer.serving.serve import API_KEY_ENV
from distinfer.serving.server_metrics import prefix_cache, scrape
from distinfer.serving.sessions import build_sessions, run_sessions
from distinfer.serving.workers import run_processes
from distinfer.serving.workers import stop as stop_workers
from distinfer.serving.workload import MAX_BUILT, ModelShape, build_requests, request_count

PROBE_TIMEOUT_S = 10.0
SERVER_ENDED = "server.ended"  # written by the job script when the server it started has ended


class EndpointError(RuntimeError):
    """The endpoint cannot be reached or does not serve the model."""


async def probe(target: Target) -> None:
    """GET /v1/models: the server answers within PROBE_TIMEOUT_S (else EndpointError naming the URL)."""
    url = target.url.rstrip("/").removesuffix("/v1") + "/v1/models"
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)) as session:
            async with session.get(url, headers=headers) as response:
                if response.status >= 500:
                    raise EndpointError(f"{url} answered HTTP {response.status}")
    except asyncio.TimeoutError:
        raise EndpointError(f"{url} did not answer within {PROBE_TIMEOUT_S:g} s") from None
    except aiohttp.ClientError as exc:
        raise EndpointError(f"cannot reach {url}: {exc}") from None


def target_of(run: RunSpec, environ: dict[str, str] | os._Environ) -> Target:
    endpoint = run.endpoint
    assert endpoint is not None
    key_env = endpoint.api_key_env
    if key_env and not environ.get(key_env):
        raise EndpointError(f"endpoint.api_key_env names {key_env}, which is not set in this environment")
    return Target(endpoint.url, endpoint.model, environ.get(key_env) if key_env else None,
                  run.load_settings.timeout_s, sampling_body(run), run.load_settings.api)


def sampling_body(run: RunSpec) -> dict:
    """The request fields of the run's sampling (greedy: the load generator's temperature 0)."""
    sampling = run.generation
    if sampling.sampling == "greedy":
        return {}
    return {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
            "seed": sampling.seed}


def summary(run: RunSpec, records: list[RequestRecord], status: str, error: str | None, started: float,
            cache: dict | None = None, cpu_share: float | None = None, clocks: list[NodeClock] | None = None,
            processes: int | None = None) -> dict:
    """The run's summary.json; `cache` the target's prefix-cache counts over the load (server_metrics.py), None
    where it does not report them; `cpu_share` the busiest client process's CPU time over the load's wall time;
    `clocks` the client nodes and their clocks' offsets, where the load came from several (else `processes`, the
    client's worker processes)."""
    load = run.scenario
    assert load is not None
    figures = summarize(records, load.slo_s or None, load.rate)
    open_loop = load.load == "trace" or (load.rate is not None and math.isfinite(load.rate))
    figures.update(client_cpu_share=cpu_share, client_processes=processes,
                   **validity(figures, open_loop, load.client.max_lag_ms / 1e3, cpu_share))
    if figures["offered_rate"] is not None and math.isinf(figures["offered_rate"]):
        figures["offered_rate"] = "inf"
    return {"status": status, "error": error, "run_id": run.run_id, "experiment": run.experiment,
            "engine": run.engine, "world_size": 1 if run.endpoint else run.world_size, "batch_size": None,
            "scenario": "serving",
            "load": load.load, "load_value": load.value, "endpoint": run.endpoint.url if run.endpoint else None,
            "served_model": run.endpoint.model if run.endpoint else (run.builtin or Path(run.model_path).name),
            "pp": run.pp, "tp": run.tp, "microbatches": run.microbatches, "precision": run.precision,
            "config_hash": run.config_hash(), **figures,
            "prompts_per_s": figures["request_throughput"],
            "prefix_cache_hit_rate": cache["hit_rate"] if cache else None, "prefix_cache": cache or "not reported",
            "client_nodes": [c.to_summary() for c in clocks] if clocks else None,
            "clock_uncertainty_ms": max(c.uncertainty_s for c in clocks) * 1e3 if clocks else None,
            "started_at": started, "finished_at": time.time(), "ranks": []}


def wait_healthy(url: str, ended: Callable[[], int | None], timeout_s: float) -> None:
    """Return once `url`/health answers; EndpointError if the server ends first (`ended()` not None: its exit
    status, or -1 where unknown) or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            code = ended()
            if code is not None:
                status = f" ({code})" if code >= 0 else ""
                raise EndpointError(f"the server at {url} exited{status} before it became healthy") from None
            if time.monotonic() > deadline:
                raise EndpointError(f"the server at {url} was not healthy within {timeout_s:g} s") from None
            time.sleep(0.1)


HEALTH_TIMEOUT_S = 300.0  # distinfer's server: loading the model
VLLM_HEALTH_TIMEOUT_S = 900.0  # vLLM's: loading, and compiling where it compiles


def api_key(environ: dict[str, str] | os._Environ) -> str:
    """The key of the run's own server: $DISTINFER_API_KEY where set (a job script sets one for its server and
    load), else a new random one. It is handed over in environments only, never written to the bundle."""
    return environ.get(API_KEY_ENV) or secrets.token_urlsafe(24)


def _own_target(run_dir: Path, run: RunSpec, url: str, ended: Callable[[], int | None], key: str) -> Target:
    """The run's server (distinfer's, or vLLM's for engine vllm) at `url` as the load's target, once /health
    answers (else EndpointError naming its log); vLLM's version and command go into run.json."""
    from distinfer.serving.serve import served_name

    vllm = capabilities(run.engine).program == "vllm"
    name = "vLLM's server" if vllm else "distinfer's server"
    default = VLLM_HEALTH_TIMEOUT_S if vllm else HEALTH_TIMEOUT_S
    try:
        wait_healthy(url, ended, run.load_settings.health_timeout_s or default)
    except EndpointError as exc:
        raise EndpointError(f"{name}: {exc}; see {run_dir / 'server.log'}") from None
    body = sampling_body(run)
    record_server(run_dir, run, url)
    if vllm:
        body["return_token_ids"] = True  # stream the token ids, as distinfer's server does
    return Target(url, served_name(run), key, run.load_settings.timeout_s, body, run.load_settings.api)


def record_server(run_dir: Path, run: RunSpec, url: str) -> None:
    """run.json gains where the run's own server ran, as its runtime: the device and host from the server's
    GET /version (distinfer's), or from vllm.json, which vLLM's start writes, with vLLM's version, command and
    VLLM_* settings as provenance."""
    info = server_version(url)
    if capabilities(run.engine).program == "vllm":
        started = read_json(run_dir / "vllm.json") or {}
        runtime = {"device": started.get("device", "?"), "hostnames": [started.get("host", "?")], "engine": "vllm"}
        provenance = {"vllm": {"version": info.get("version"), "command": started.get("command"),
                               "env": started.get("env")}}
    else:
        runtime = {"device": info.get("device", "?"), "hostnames": [info.get("hostname", "?")],
                   "engine": run.engine, **{k: v for k, v in info.items() if k not in ("device", "hostname",
                                                                                      "version", "engine")}}
        provenance = {}
    run_json = read_json(run_dir / "run.json") or {}
    run_json.setdefault("provenance", {}).update(provenance)
    run_json["runtime"] = runtime
    atomic_write_json(run_dir / "run.json", run_json)


def server_version(url: str) -> dict:
    """The server's GET /version (vLLM's: its version; distinfer's: its version, device and host), or {}."""
    try:
        with urllib.request.urlopen(url + "/version", timeout=5) as response:
            info = json.loads(response.read())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


@contextlib.contextmanager
def vllm_target(run_dir: Path, run: RunSpec) -> Iterator[Target]:
    """vLLM's server for this run (`python -m distinfer.serving.vllm`, which becomes `vllm serve`) on a free
    loopback port in its own process group, its output in server.log; yields the target once /health answers;
    then stops the group (SIGTERM, then SIGKILL) and removes the shared-memory files it left."""
    from distinfer.serving.vllm import leftovers, remove, stop_group

    port, key = free_port(), api_key(os.environ)
    before = leftovers()
    with (run_dir / "server.log").open("w") as log:
        server = subprocess.Popen([sys.executable, "-m", "distinfer.serving.vllm", str(run_dir), "--port", str(port)],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, API_KEY_ENV: key})
        try:
            yield _own_target(run_dir, run, f"http://127.0.0.1:{port}", server.poll, key)
        finally:
            stop_group(server)
            remove(leftovers() - before)


@contextlib.contextmanager
def own_server(run_dir: Path, run: RunSpec) -> Iterator[Target]:
    """distinfer's server for this run (`python -m distinfer.serving.serve`, which starts a multi-rank layout's
    ranks) on a free loopback port, its output in server.log; yields the target once /health answers; stopped
    by its PID (SIGTERM, then SIGKILL)."""
    if capabilities(run.engine).program == "vllm":
        with vllm_target(run_dir, run) as target:
            yield target
        return
    port, key = free_port(), api_key(os.environ)
    log = (run_dir / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "distinfer.serving.serve", str(run_dir), "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, API_KEY_ENV: key})
    url = f"http://127.0.0.1:{port}"
    try:
        yield _own_target(run_dir, run, url, server.poll, key)
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        log.close()


def started_server(run_dir: Path, run: RunSpec, url: str) -> Target:
    """distinfer's server that the job started beside this process (on Slurm, its ranks on the allocation): the
    target once /health answers; the job script touches SERVER_ENDED in the run folder if the server ends, and
    gives the server and this process the same key in $DISTINFER_API_KEY."""
    def ended() -> int | None:
        return -1 if (run_dir / SERVER_ENDED).exists() else None

    return _own_target(run_dir, run, url, ended, os.environ.get(API_KEY_ENV, ""))


def write_completions(run_dir: Path, records: list[RequestRecord], prompts_file: Path) -> None:
    """completions.jsonl from the served token ids: each prompt once (its first request), in the prompt file's
    order, as an offline run writes it, so that the analysis checks them against the reference."""
    from distinfer.prompts import load_prompts

    served = {}
    for record in records:
        if record.ok and record.token_ids is not None:
            served.setdefault(record.prompt_id, record)
    writer = JsonlWriter(run_dir / "completions.jsonl")
    try:
        for prompt in load_prompts(prompts_file):
            record = served.get(prompt.id)
            if record is not None:
                writer.write({"id": prompt.id, "prompt": prompt.prompt, "output_token_ids": record.token_ids,
                              "text": record.text, "finish_reason": record.finish_reason})
    finally:
        writer.close()


def client_node() -> int:
    """This process's client node of a load sent from several (its task in the job's load step), 0 elsewhere."""
    return int(os.environ.get("SLURM_PROCID", "0") or 0)


def join_load(run_dir: Path, node: int) -> int:
    """A client node after the first: its share of the load, its records sent to the first node (which writes
    the bundle); an error on stderr and exit status 1 if it cannot take part."""
    workers: list = []

    def stop(signum: int, _frame: object) -> None:
        stop_workers(workers)
        os._exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    try:
        join(run_dir, node, os.environ.get(API_KEY_ENV, ""), started=workers.extend)
    except (ClientNodesError, OSError, EOFError, ValueError) as exc:
        print(f"distinfer: client node {node}: {exc}", file=sys.stderr)
        return 1
    return 0


def run(run_dir: Path, server_url: str | None = None) -> int:
    """Measure the run's load; against `server_url` where the job started the server itself."""
    bundle = RunBundle(run_dir)
    spec = RunSpec.from_dict((read_json(bundle.run_json) or {})["run"])
    load = spec.scenario
    assert load is not None, "a serving run"
    nodes = load.client.nodes
    if nodes > 1 and client_node() > 0:
        return join_load(run_dir, client_node())
    started = time.time()
    records: list[RequestRecord] = []
    writer = JsonlWriter(run_dir / "requests.jsonl", sync_every_s=1.0)  # flushed per record, synced each second
    stack = contextlib.ExitStack()

    workers: list = []  # the client's worker processes, where the load has some

    def stop(signum: int, _frame: object) -> None:  # scancel, Ctrl-C, or the job's time limit
        stop_workers(workers)
        status, error = stopped(signal.Signals(signum).name, os.environ, time.time())
        atomic_write_json(bundle.summary_json, summary(spec, records, status, error, started))
        stack.close()  # the server, if this run started one
        os._exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)

    def keep(record: RequestRecord) -> None:
        records.append(record)
        writer.write(record.to_dict())

    clocks: list[NodeClock] | None = None
    processes: int | None = None
    try:
        if nodes > 1 and not (server_url and os.environ.get("SLURM_JOB_ID") and os.environ.get(API_KEY_ENV)):
            raise ValueError(f"scenario.client.nodes: {nodes} sends the load from {nodes} nodes of a Slurm "
                             "allocation: submit the experiment (`distinfer submit`), or set client.nodes: 1 to "
                             "send it from here")
        if load.input == "sessions":
            work = build_sessions(load, spec.model_path, load.warmup_requests + min(request_count(load), MAX_BUILT))
        else:
            work = build_requests(load, Path(spec.prompts), spec.generation.max_new_tokens,
                                  ModelShape.of(spec.model_path))
        if spec.endpoint:
            target = target_of(spec, os.environ)
        elif server_url:
            target = started_server(run_dir, spec, server_url)
        else:
            target = stack.enter_context(own_server(run_dir, spec))
        asyncio.run(probe(target))
        processes = 1 if load.input == "sessions" else worker_processes(load.client.processes, work, load.rate)
        counters = scrape(target.url, target.api_key)
        cpu, wall, spin = time.process_time(), time.monotonic(), Spin.idle_s
        timing = {"rate": load.rate, "burstiness": load.gap_shape, "seed": load.seed, "concurrency": load.users,
                  "duration_s": load.duration_s}
        if load.input == "sessions":
            asyncio.run(run_sessions(target, work, keep, load.ignore_eos, **timing))
            cpu_share = busy_share(cpu, wall, spin)
        elif nodes > 1:
            cpu_share, clocks = coordinate(run_dir, target, work, keep, nodes, load.client.processes,
                                           os.environ[API_KEY_ENV], **timing, started=workers.extend)
            processes = None  # each node's own, in clocks
        elif processes and processes > 1:  # the run only waits: the busiest worker is what may limit the load
            cpu_share = run_processes(target, work, keep, processes, **timing, started=workers.extend)
        else:
            asyncio.run(run_load(target, work, keep, **timing))
            cpu_share = busy_share(cpu, wall, spin)
        cache = prefix_cache(counters, scrape(target.url, target.api_key))
    except (EndpointError, ClientNodesError, ValueError, OSError) as exc:
        atomic_write_json(bundle.summary_json, summary(spec, records, "failed", str(exc), started))
        return 1
    finally:
        writer.close()
        stack.close()
    if not spec.endpoint:
        write_completions(run_dir, records, Path(spec.prompts))
    failed = [r for r in records if not r.warmup and not r.ok]
    error = None
    if failed:
        examples = "; ".join(sorted({r.error or f"HTTP {r.status}" for r in failed})[:3])
        error = f"{len(failed)} of {sum(not r.warmup for r in records)} requests failed: {examples}"
    atomic_write_json(bundle.summary_json, summary(spec, records, "failed" if failed else "ok", error, started, cache,
                                                   cpu_share, clocks, processes))
    return 1 if failed else 0

