"""What each rank runs (entry point: `python -m distinfer.runtime RUN_DIR`, started by torchrun or srun).

Reads run.json, joins the process group, loads this rank's part of the model, generates every
batch (warm-up excluded from the metrics), and writes the rank's log and metrics. Rank 0 writes
completions.jsonl as they are produced and summary.json last.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from distinfer.bundle import JsonlWriter, RunBundle, atomic_write_json, read_json
from distinfer.layout import split_layers
from distinfer.metrics import LatencyReport, rank_totals
from distinfer.models.loading import count_parameters, load_full_model, load_stage_model, load_tokenizer
from distinfer.models.profiles import model_layer_count
from distinfer.plan import RunSpec
from distinfer.prompts import Prompt, load_prompts
from distinfer.provenance import allowed_env
from distinfer.runtime.dist import DistEnv, dist_env_from, init_distributed, shutdown_distributed
from distinfer.runtime.monitor import UtilizationSampler
from distinfer.runtime.pipeline import Batch, PipelineEngine, StopRule
from distinfer.runtime.reference import ReferenceEngine
from distinfer.runtime.sampling import Sampler, SamplingParams

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


def sampling_params(generation: dict) -> SamplingParams:
    return SamplingParams(
        greedy=generation["sampling"] == "greedy",
        temperature=generation["temperature"],
        top_k=generation["top_k"],
        top_p=generation["top_p"],
        seed=generation["seed"],
    )


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


def build_engine(spec: RunSpec, env: DistEnv, device: torch.device, tokenizer, spec_dir: Path) -> tuple[object, dict]:  # noqa: ANN001,E501
    """The engine of this rank and facts about its share of the model."""
    model_dir = Path(spec.model_path)
    stop = stop_rule(model_dir, tokenizer, spec.generation["max_new_tokens"])
    sampler = Sampler(sampling_params(spec.generation), device)
    if spec.engine == "reference":
        model = load_full_model(model_dir, spec.dtype, device, spec.trust_remote_code)
        layers = list(range(model_layer_count(model_dir)))
        info = {"layers": layers, "parameters": count_parameters(model)}
        return ReferenceEngine(model, device, sampler.params, stop), info
    if env.world_size != spec.world_size:
        raise RuntimeError(f"run needs {spec.world_size} ranks but was started with {env.world_size}")
    if spec.engine == "deepspeed":
        from distinfer.runtime.tensor import build_deepspeed_engine

        engine = build_deepspeed_engine(model_dir, Path(spec_dir) / "ds_config.json", env, device,
                                        sampler.params, stop, spec.trust_remote_code)
        layers = list(range(model_layer_count(model_dir)))
        return engine, {"layers": layers, "parameters": count_parameters(engine.model)}
    layout = split_layers(model_layer_count(model_dir), spec.pp, spec.layers)[env.rank]
    model, family = load_stage_model(model_dir, layout, spec.dtype, device, spec.trust_remote_code)
    info = {"layers": list(range(layout.start, layout.stop)), "parameters": count_parameters(model)}
    engine = PipelineEngine(model, family, env.rank, env.world_size, device, sampler, stop, spec.microbatches)
    return engine, info


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def generate_all(spec: RunSpec, env: DistEnv, device: torch.device, bundle: RunBundle, state: dict) -> None:
    """Load, tokenize, warm up, and generate every batch `repeats` times; fills `state` as it goes."""
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(Path(spec.model_path), spec.trust_remote_code)
    engine, info = build_engine(spec, env, device, tokenizer, bundle.root)
    state.update(info, load_s=time.perf_counter() - t0)
    log.info("loaded layers %s (%d parameters) in %.2fs", info["layers"][:1] + info["layers"][-1:],
             info["parameters"], state["load_s"])
    t0 = time.perf_counter()
    prompts = load_prompts(Path(spec.prompts))
    batches = make_batches(prompts, tokenizer, spec.batch_size, spec.generation.get("max_prompt_tokens"))
    state["tokenize_s"] = time.perf_counter() - t0
    for _ in range(spec.warmup):
        engine.generate(batches[0])
    engine.steps.clear()
    latency = LatencyReport()
    writer = JsonlWriter(bundle.completions) if env.rank == 0 else None
    try:
        for repeat in range(spec.repeats):
            if hasattr(engine, "sampler"):
                engine.sampler.reset()  # each repeat reproduces the same sampled completions
            for batch in batches:
                out = engine.generate(batch)
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
    state["steps"] = engine.steps


def _rank_record(env: DistEnv, device: torch.device, state: dict, util: dict) -> dict:
    return {
        "rank": env.rank,
        "hostname": socket.gethostname(),
        "layers": state.get("layers", []),
        "parameters": state.get("parameters"),
        **rank_totals(state.get("steps", [])),
        "peak_memory_bytes": _peak_memory(device),
        "load_s": state.get("load_s"),
        "tokenize_s": state.get("tokenize_s"),
        "threads": torch.get_num_threads(),
        "utilization": util,
        "error": state.get("error"),
    }


def _write_outcome(bundle: RunBundle, spec: RunSpec, env: DistEnv, run_info: dict, status: str, state: dict,
                   ranks: list[dict], device: torch.device, started: float) -> None:
    """Rank 0's last word: runtime facts into run.json, then summary.json (atomically, last)."""
    run_info["runtime"] = {"hostnames": sorted({r["hostname"] for r in ranks}), "env": allowed_env(os.environ),
                           "threads_per_rank": torch.get_num_threads(), "device": str(device)}
    atomic_write_json(bundle.run_json, run_info)
    summary = {
        "status": status,
        "error": state.get("error"),
        "run_id": spec.run_id,
        "experiment": spec.experiment,
        "engine": spec.engine,
        "world_size": env.world_size,
        "pp": spec.pp,
        "tp": spec.tp,
        "microbatches": spec.microbatches,
        "batch_size": spec.batch_size,
        "dtype": spec.dtype,
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
    state: dict = {}
    device = torch.device("cpu")
    started = time.time()
    sampler = UtilizationSampler(gpu_index=env.local_rank if torch.cuda.is_available() else None)

    def stop(signum: int) -> None:
        # What is written so far stays: completions line by line; this rank's metrics and rank 0's summary now.
        name = signal.Signals(signum).name
        state["error"] = f"rank {env.rank}: stopped by {name} (Slurm time limit, scancel or Ctrl-C)"
        log.error("run stopped: %s", state["error"])
        record = _rank_record(env, device, state, sampler.summary())
        atomic_write_json(bundle.rank_metrics(env.rank), {**record, "steps": state.get("steps", [])})
        if env.rank == 0:
            _write_outcome(bundle, spec, env, run_info, "cancelled", state, [record], device, started)
        logging.shutdown()
        os._exit(128 + signum)

    _watch_stop_signals(stop)
    with sampler:
        try:
            device = init_distributed(env, spec.timeout_s)
            generate_all(spec, env, device, bundle, state)
            status = "ok"
        except Exception as exc:  # the run fails; the bundle says why instead of a lost traceback
            status = "failed"
            state["error"] = f"rank {env.rank}: {type(exc).__name__}: {exc}"
            log.error("run failed: %s\n%s", state["error"], traceback.format_exc())
    record = _rank_record(env, device, state, sampler.summary())
    atomic_write_json(bundle.rank_metrics(env.rank), {**record, "steps": state.get("steps", [])})
    ranks = [record]
    if status == "ok" and env.world_size > 1:
        gathered: list | None = [None] * env.world_size if env.rank == 0 else None
        dist.gather_object(record, gathered, dst=0)
        ranks = gathered or []
    if env.rank == 0:
        _write_outcome(bundle, spec, env, run_info, status, state, ranks, device, started)
    log.info("finished run %s: %s", spec.run_id, status)
    shutdown_distributed()
    return 0 if status == "ok" else 1


def main() -> None:
    if len(sys.argv) != 2:
        print("usage: python -m distinfer.runtime RUN_DIR", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(run(Path(sys.argv[1])))


