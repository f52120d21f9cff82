"""What each rank runs (entry point: `python -m distinfer.runtime RUN_DIR`, started by torchrun or srun).

Reads run.json, joins the process group, loads this rank's part of the model, generates every
batch (warm-up excluded from the metrics), and writes the rank's log and metrics. Rank 0 writes
completions.jsonl as they are produced and summary.json last.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from distinfer.bundle import JsonlWriter, RunBundle, atomic_write_json, read_json
from distinfer.engines import capabilities
from distinfer.finalize import stopped
from distinfer.metrics import LatencyReport, rank_totals
from distinfer.models.loading import load_tokenizer
from distinfer.plan import RunSpec
from distinfer.prompts import Prompt, build_prompt_set, load_prompts, take_prompts
from distinfer.provenance import allowed_env
from distinfer.runtime.dist import init_distributed, shutdown_distributed
from distinfer.runtime.engines import EngineContext, build_engine
from distinfer.runtime.monitor import UtilizationSampler, gpu_facts
from distinfer.runtime.pipeline import Batch, StopRule
from distinfer.runtime.ranks import DistEnv, dist_env_from
from distinfer.runtime.sampling import Sampler, SamplingParams
from distinfer.spec_schema import GenerationSpec

log = logging.getLogger("distinfer.worker")


def _setup_logging(path: Path, rank: int) -> None:
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(message)s"))
    root = logging.getLogger("distinfer")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def stop_rule(model_dir: Path, tokenizer, max_new_tokens: int) -> StopRule:  # noqa: ANN001
    """EOS ids from generation_config.json (what `generate` uses), else the tokenizer's."""
    eos = (read_json(model_dir / "generation_config.json") or {}).get("eos_token_id", tokenizer.eos_token_id)
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return StopRule(max_new_tokens=max_new_tokens, eos_token_ids=eos_ids, pad_token_id=int(tokenizer.pad_token_id))


def sampling_params(generation: GenerationSpec) -> SamplingParams:
    return SamplingParams(greedy=generation.sampling == "greedy", temperature=generation.temperature,
                          top_k=generation.top_k, top_p=generation.top_p, seed=generation.seed)


def make_batches(prompts: list[Prompt], tokenizer, batch_size: int, max_prompt_tokens: int | None = None) -> list[Batch]:  # noqa: ANN001,E501
    """Consecutive prompts in batches, each left-padded to its longest prompt (cut from the left if too long)."""
    batches = []
    tokenizer.truncation_side = "left"
    for index, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start : start + batch_size]
        enc = tokenizer([p.prompt for p in chunk], return_tensors="pt", padding=True,
                        truncation=max_prompt_tokens is not None, max_length=max_prompt_tokens)
        batches.append(Batch(index, list(range(start, start + len(chunk))), enc["input_ids"], enc["attention_mask"]))
    return batches


def run_prompts(spec: RunSpec) -> list[Prompt]:
    """The run's prompts: the JSONL file or the long-context set built from a text file; for weak scaling,
    the first `num_prompts` of them."""
    if spec.prompt_set:
        prompts = build_prompt_set(Path(spec.prompts), spec.prompt_set["context_tokens"], spec.prompt_set["count"],
                                   spec.prompt_set["question"])
    else:
        prompts = load_prompts(Path(spec.prompts))
    return take_prompts(prompts, spec.num_prompts) if spec.num_prompts else prompts


MEMORY_LIMIT_ENV = "DISTINFER_RANK_MEMORY_LIMIT"


def apply_memory_limit(device: torch.device, environ: dict[str, str] | os._Environ) -> int | None:
    """Cap this rank's memory at DISTINFER_RANK_MEMORY_LIMIT bytes, to find out what a smaller device can run:
    on CUDA as a fraction of the GPU's memory, on CPU as RLIMIT_DATA (the heap, where tensors live)."""
    value = environ.get(MEMORY_LIMIT_ENV)
    if not value:
        return None
    limit = int(value)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), device)
    else:
        resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    return limit


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a RuntimeError), or Python's MemoryError."""
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(exc)


def layer_span(layers: list[int]) -> str:
    """'3-5' for layers [3, 4, 5], '3' for [3], '' for none."""
    return "-".join(str(n) for n in dict.fromkeys(layers[:1] + layers[-1:]))


def out_of_memory_report(spec: RunSpec, env: DistEnv, device: torch.device, state: dict) -> str:
    batch = state.get("batch") or {}
    where = (f"batch {batch['index']} ({batch['size']} prompt(s) of up to {batch['prompt_tokens']} tokens "
             f"+ {spec.generation.max_new_tokens} new)" if batch else "loading the model")
    limit = state.get("memory_limit")
    return (f"rank {env.rank}: out of memory in {where}, batch_size {spec.batch_size}, {spec.precision}, "
            f"layers {layer_span(state.get('layers', []))}; peak "
            f"{_peak_memory(device) / 2**30:.2f} GiB" + (f" of a {limit / 2**30:.2f} GiB limit" if limit else "")
            + ". Lower batch_size or the prompt length, or use more stages (`distinfer plan` estimates this)")


@contextlib.contextmanager
def _profiled(spec: RunSpec, env: DistEnv, bundle: RunBundle, first: bool, device: torch.device) -> Iterator[None]:
    """With `profile: torch`, a torch.profiler trace of the first measured batch: trace_rank_<r>.json."""
    if spec.profile != "torch" or not first:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        yield
    prof.export_chrome_trace(str(bundle.root / f"trace_rank_{env.rank}.json"))


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def generate_all(spec: RunSpec, env: DistEnv, device: torch.device, bundle: RunBundle, state: dict) -> None:
    """Load, tokenize, warm up, and generate every batch `repeats` times; fills `state` as it goes."""
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(Path(spec.model_path), spec.trust_remote_code)
    stop = stop_rule(Path(spec.model_path), tokenizer, spec.generation.max_new_tokens)
    sampler = Sampler(sampling_params(spec.generation), device)
    engine, info = build_engine(EngineContext(spec, env, device, tokenizer, bundle.root, stop, sampler))
    state.update(info, load_s=time.perf_counter() - t0)
    log.info("loaded layers %s (%d parameters) in %.2fs", layer_span(info["layers"]),
             info["parameters"], state["load_s"])
    for kind, choice in (info.get("kernels") or {}).items():
        rates = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in choice["read_bytes_per_s"].items())
        log.info("%s linear kernel: %s (weights read at GB/s: %s)", kind.replace("_", "-"), choice["kernel"], rates)
    if "decode_path" in info:
        rows = info.get("one_call_rows")
        whole = f"; steps of {rows[0]}-{rows[1]} rows in one C++ call" if rows else ""
        log.info("decode steps through %s%s", info["decode_path"], whole)
    if "transport" in info:
        log.info("messages between stages through %s", info["transport"])
    t0 = time.perf_counter()
    prompts = run_prompts(spec)
    batches = make_batches(prompts, tokenizer, spec.batch_size, spec.generation.max_prompt_tokens)
    state["tokenize_s"] = time.perf_counter() - t0
    def note(batch: Batch) -> Batch:  # what an out-of-memory report names
        state["batch"] = {"index": batch.index, "size": len(batch.prompt_indices),
                          "prompt_tokens": int(batch.input_ids.shape[1])}
        return batch

    for _ in range(spec.warmup):
        engine.generate(note(batches[0]))
    engine.steps.clear()
    if "expert_stats" in state:
        state["expert_stats"].reset()  # the measured batches' routing only
    latency = LatencyReport()
    writer = JsonlWriter(bundle.completions) if env.rank == 0 else None
    try:
        for repeat in range(spec.repeats):
            sampler.reset()  # each repeat reproduces the same sampled completions
            for batch in batches:
                with _profiled(spec, env, bundle, repeat == 0 and batch.index == 0, device):
                    out = engine.generate(note(batch))
                if out is None:
                    continue
                latency.add_batch(out.token_times, time.perf_counter() - out.start)
                log.info("repeat %d batch %d: %d tokens", repeat, batch.index, sum(map(len, out.tokens)))
                if writer is not None and repeat == 0:
                    for row, index in enumerate(batch.prompt_indices):
                        ids = out.tokens[row]
                        writer.write({
                            "id": prompts[index].id,
                            "prompt": prompts[index].prompt,
                            "output_token_ids": ids,
                            "text": tokenizer.decode(ids, skip_special_tokens=True),
                            "finish_reason": "eos" if ids and ids[-1] in engine.stop.eos_token_ids else "length",
                        })
    finally:
        if writer is not None:
            writer.close()
    state["latency"] = latency.summary()
    state["samples"] = latency.samples()
    state["steps"] = engine.steps


def _rank_record(env: DistEnv, device: torch.device, state: dict, util: dict) -> dict:
    kernels = state.get("kernels") or {}  # runtime/cpu/kernels.py's choices, CPU pipeline ranks only
    return {
        "rank": env.rank,
        "status": state.get("status", "failed"),
        "hostname": socket.gethostname(),
        "layers": state.get("layers", []),
        "stage": state.get("stage"),  # with tp / ep inside pipeline stages: this rank's stage and its place in it
        "tp_rank": state.get("tp_rank"),
        "ep_rank": state.get("ep_rank"),
        **(state["expert_stats"].facts() if "expert_stats" in state else {}),  # tokens per expert, all-to-all s
        "parameters": state.get("parameters"),
        **rank_totals(state.get("steps", [])),
        "peak_memory_bytes": _peak_memory(device),
        "load_s": state.get("load_s"),
        "tokenize_s": state.get("tokenize_s"),
        "threads": torch.get_num_threads(),
        "one_row_kernel": kernels.get("one_row", {}).get("kernel"),
        "few_rows_kernel": kernels.get("few_rows", {}).get("kernel"),
        "decode_path": state.get("decode_path"),  # pipeline ranks: runtime/cpu/llama_decode.py's, or transformers
        "one_call_rows": state.get("one_call_rows"),  # [first, last]: step sizes run as one C++ call, or None
        "transport": state.get("transport"),  # pipeline ranks: gloo / nccl, or shared memory (runtime/cpu/shm_ring.py)
        "openmp_spin_count": os.environ.get("GOMP_SPINCOUNT"),  # runtime/cpu/openmp.py; None: OpenMP's default
        "utilization": util,
        "error": state.get("error"),
    }


def _write_outcome(bundle: RunBundle, spec: RunSpec, env: DistEnv, run_info: dict, status: str, state: dict,
                   ranks: list[dict], device: torch.device, started: float) -> None:
    """Rank 0's last word: runtime facts into run.json, then summary.json (atomically, last)."""
    run_info["runtime"] = {"hostnames": sorted({r["hostname"] for r in ranks}), "env": allowed_env(os.environ),
                           "threads_per_rank": torch.get_num_threads(), "device": str(device),
                           **gpu_facts(device.index if device.type == "cuda" else None)}
    atomic_write_json(bundle.run_json, run_info)
    if state.get("samples"):
        atomic_write_json(bundle.root / "samples.json", state["samples"])
    summary = {
        "status": status,
        "error": state.get("error"),
        **spec.summary_fields(),
        "world_size": env.world_size,
        "perplexity": state.get("perplexity"),
        "perplexity_tokens": state.get("perplexity_tokens"),
        "config_hash": run_info.get("config_hash"),
        **(state.get("latency") or LatencyReport().summary()),
        "load_s": state.get("load_s"),
        "tokenize_s": state.get("tokenize_s"),
        "started_at": started,
        "finished_at": time.time(),
        "ranks": sorted(ranks, key=lambda r: r["rank"]),
    }
    atomic_write_json(bundle.summary_json, summary)


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
STOP_GRACE_S = 2.0  # how long a failed rank of a multi-rank run waits for a stop signal before it reports failure


def _watch_stop_signals(on_stop) -> None:  # noqa: ANN001
    """SIGTERM (Slurm's time limit and scancel) or Ctrl-C: handled by a thread, because the main thread
    may sit in a blocking receive that a Python signal handler would not interrupt. The entry point
    blocks them before any thread exists; blocking again here covers callers that did not."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    def wait() -> None:
        on_stop(signal.sigwait(STOP_SIGNALS))

    threading.Thread(target=wait, daemon=True, name="stop-signals").start()


def run(run_dir: Path) -> int:
    bundle = RunBundle(run_dir)
    env = dist_env_from(os.environ)
    _setup_logging(bundle.rank_log(env.rank), env.rank)
    run_info = read_json(bundle.run_json)
    spec = RunSpec.from_dict(run_info["run"])
    log.info("start run %s: rank %d of %d on %s", spec.run_id, env.rank, env.world_size, socket.gethostname())
    log.info("OpenMP spin count: %s", os.environ.get("GOMP_SPINCOUNT", "default"))  # runtime/cpu/openmp.py
    state: dict = {}
    device = torch.device("cpu")
    started = time.time()
    sampler = UtilizationSampler(gpu_index=env.local_rank if torch.cuda.is_available() else None)

    # A stop signal and the end of the run race to write this rank's outcome: the first one writes it. When a
    # peer stops first, this rank's receive fails just after the signal; that failure is not the outcome.
    stopping, outcome_lock = threading.Event(), threading.Lock()

    def stop(signum: int) -> None:
        # What is written so far stays: completions line by line; this rank's metrics and rank 0's summary now.
        stopping.set()
        # Held until the process exits. The end of the run may hold it, stuck in the final gather with a dead
        # peer: after the grace this handler writes anyway.
        outcome_lock.acquire(timeout=STOP_GRACE_S)
        try:
            if not state.get("outcome_written"):
                write_stopped(signal.Signals(signum).name)
        finally:
            logging.shutdown()
            os._exit(128 + signum)

    def write_stopped(name: str) -> None:
        state["status"], error = stopped(name, os.environ, time.time())
        state["error"] = f"rank {env.rank}: {error}"
        log.error("run stopped: %s", state["error"])
        record = _rank_record(env, device, state, sampler.summary())
        atomic_write_json(bundle.rank_metrics(env.rank), {**record, "steps": state.get("steps", [])})
        if env.rank == 0:
            _write_outcome(bundle, spec, env, run_info, state["status"], state, [record], device, started)

    _watch_stop_signals(stop)
    with sampler:
        try:
            # Without micro-batches one pipeline stage computes at a time: each may use every core. The ranks of
            # a stage split by tp or ep compute at the same time, as DeepSpeed's do: an even share each.
            together = not (capabilities(spec.engine).microbatches and spec.microbatches == 1
                            and max(spec.tp, spec.ep) == 1)
            device = init_distributed(env, spec.timeout_s, together)
            state["memory_limit"] = apply_memory_limit(device, os.environ)
            generate_all(spec, env, device, bundle, state)
            status = state["status"] = "ok"
        except Exception as exc:  # the run fails; the bundle says why instead of a lost traceback
            # A launcher stops every rank at once: a peer that stopped first breaks this rank's receive
            # a moment before this rank's own signal comes. The signal's handler then writes and exits.
            if stopping.wait(STOP_GRACE_S if env.world_size > 1 else 0):
                threading.Event().wait()
            status = state["status"] = "failed"
            state["error"] = f"rank {env.rank}: {type(exc).__name__}: {exc}"
            if is_out_of_memory(exc):
                state["error"] = f"{out_of_memory_report(spec, env, device, state)} ({type(exc).__name__}: {exc})"
                state["out_of_memory"] = True
            log.error("run failed: %s\n%s", state["error"], traceback.format_exc())
    with outcome_lock:
        record = _rank_record(env, device, state, sampler.summary())
        atomic_write_json(bundle.rank_metrics(env.rank), {**record, "steps": state.get("steps", [])})
        ranks = [record]
        if status == "ok" and env.world_size > 1:
            gathered: list | None = [None] * env.world_size if env.rank == 0 else None
            dist.gather_object(record, gathered, dst=0)
            ranks = gathered or []
        if env.rank == 0:
            _write_outcome(bundle, spec, env, run_info, status, state, ranks, device, started)
        state["outcome_written"] = True
    log.info("finished run %s: %s", spec.run_id, status)
    shutdown_distributed()
    return 0 if status == "ok" else 1


def main() -> None:
    if len(sys.argv) != 2:
        print("usage: python -m distinfer.runtime RUN_DIR", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(run(Path(sys.argv[1])))


