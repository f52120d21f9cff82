"""`distinfer serve`: one run's layout behind the OpenAI-compatible server, in the foreground until SIGINT/SIGTERM.

Every rank loads its pipeline stage (a one-rank layout: the whole model) or, in a DeepSpeed tensor-parallel
layout, its shard of every layer; rank 0 also runs the scheduler (engine.py) and uvicorn on the given host
and port, the other ranks run their stage's loop or apply rank 0's steps to their shards (pipeline.py) until
rank 0 stops them. A multi-rank layout started as one process (`distinfer serve`, or the serving run's
own server on one machine) starts its ranks as processes here; on Slurm one task per node starts that node's
ranks, which meet at the first node (templates/serving.sbatch.tmpl). Ranks
after the first ignore SIGINT and SIGTERM: rank 0 stops them once its requests are answered, and they end on
their own if rank 0 goes away.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from distinfer.engines import SERVED_BY_DISTINFER, capabilities
from distinfer.plan import RunSpec

if TYPE_CHECKING:
    import torch

    from distinfer.runtime.ranks import DistEnv
    from distinfer.serving.stages import StageState

API_KEY_ENV = "DISTINFER_API_KEY"  # the server's key travels in the environment, never on a command line or in a file


def served_name(run: RunSpec) -> str:
    """The model name clients ask for: the built-in model's, else the model folder's."""
    return run.builtin or Path(run.model_path).name


def groups_of(run: RunSpec) -> int:
    """Groups of requests the run's server keeps in flight (engines.py: for distinfer's pipeline the run's
    micro-batches, at least one per stage)."""
    return capabilities(run.engine).groups(run.pp, run.microbatches)


def serve(run: RunSpec, host: str, port: int, max_batch: int = 32, ranks_per_node: int | None = None,
          rendezvous: str | None = None, run_json: Path | None = None, log_requests: bool = False) -> None:
    """Serve `run` from this process: in place for one rank (or a rank this module started), else as the parent
    of this node's ranks: all of them on one machine, or on a Slurm node `ranks_per_node` of them (global ranks
    from SLURM_NODEID), meeting at `rendezvous` (HOST:PORT, the first node's). The ranks read the run from
    `run_json` (a bundle's), else from a temporary copy."""
    if not capabilities(run.engine).served_by_distinfer:
        raise ValueError(f"{run.run_id}: distinfer's server runs the {', '.join(SERVED_BY_DISTINFER)} engines; "
                         f"got {run.engine}")
    if run.world_size == 1 or "RANK" in os.environ:
        serve_rank(run, host, port, max_batch, log_requests)
        return
    per_node = ranks_per_node or run.world_size
    first = int(os.environ.get("SLURM_NODEID", 0)) * per_node
    ranks = range(first, first + per_node)
    if run_json is not None:  # the run's bundle: the ranks read its run.json
        failed = _spawn_ranks(run_json, ranks, run.world_size, rendezvous, host, port, max_batch, log_requests)
    else:
        with tempfile.TemporaryDirectory(prefix="distinfer-serve-") as folder:
            run_json = Path(folder) / "run.json"
            run_json.write_text(json.dumps({"run": run.to_dict()}))
            failed = _spawn_ranks(run_json, ranks, run.world_size, rendezvous, host, port, max_batch, log_requests)
    if failed:
        raise RuntimeError("the server's ranks failed: " + ", ".join(
            f"rank {rank} exited with {code}" + (f" ({signal.Signals(-code).name})" if code < 0 else "")
            for rank, code in failed))


def _spawn_ranks(run_json: Path, ranks: range, world_size: int, rendezvous: str | None, host: str, port: int,
                 max_batch: int, log_requests: bool) -> list[tuple[int, int]]:
    """This node's ranks as processes, in the foreground (rendezvous: the loopback address when all ranks run
    here). SIGINT and SIGTERM go to the first of them, which is rank 0 on the first node and stops the others
    (a later rank ignores them); if a rank fails, this node's others are stopped. Returns (rank, exit status) of
    every rank that did not end cleanly, once all have ended."""
    import subprocess
    import time

    from distinfer.net import free_port

    master, _, master_port = (rendezvous or f"127.0.0.1:{free_port()}").rpartition(":")
    base = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                MASTER_ADDR=master, MASTER_PORT=master_port, WORLD_SIZE=str(world_size),
                LOCAL_WORLD_SIZE=str(len(ranks)))
    command = [sys.executable, "-m", "distinfer.serving.serve", str(run_json), "--host", host, "--port", str(port),
               "--max-batch", str(max_batch), *(["--log-requests"] if log_requests else [])]
    procs = [subprocess.Popen(command, env={**base, "RANK": str(rank), "LOCAL_RANK": str(local)})
             for local, rank in enumerate(ranks)]
    forward = lambda signum, _frame: procs[0].poll() is None and procs[0].send_signal(signum)  # noqa: E731
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.2)
        failing = any(p.poll() not in (None, 0, -signal.SIGTERM) for p in procs)
        deadline = time.monotonic() + 30
        for proc in procs:  # the others end by themselves when rank 0 stops them; else they are stopped here
            if failing and proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return [(rank, p.returncode) for rank, p in zip(ranks, procs) if p.returncode not in (0, -signal.SIGTERM)]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def serve_rank(run: RunSpec, host: str, port: int, max_batch: int, log_requests: bool = False) -> None:
    """One rank of the server: load the stage; rank 0 serves HTTP, the others run their stage's loop."""
    import torch

    from distinfer.bundle import read_json
    from distinfer.models.loading import load_tokenizer
    from distinfer.models.profiles import max_positions
    from distinfer.runtime.dist import init_distributed, shutdown_distributed
    from distinfer.runtime.ranks import dist_env_from
    from distinfer.runtime.worker import stop_rule
    from distinfer.serving.pipeline import StageLink, TensorPeers, run_later_stage, run_tensor_peer

    env = dist_env_from(os.environ)
    if env.world_size != run.world_size:
        raise RuntimeError(f"{run.run_id} needs {run.world_size} ranks but was started with {env.world_size}")
    model_dir = Path(run.model_path)
    device = init_distributed(env, run.timeout_s)
    stage = load_stage(run, env, device)
    link = StageLink(env.rank, env.world_size, device) if env.world_size > 1 and run.pp > 1 else None
    peers = TensorPeers() if run.tp > 1 else None
    try:
        if env.rank > 0:
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_IGN)
            with torch.inference_mode():
                if peers is not None:
                    run_tensor_peer(stage, peers)
                else:
                    run_later_stage(stage, link)
            return
        tokenizer = load_tokenizer(model_dir, run.trust_remote_code)
        stop = stop_rule(model_dir, tokenizer, 1)
        _serve_http(run, stage, link, peers, tokenizer, stop.eos_token_ids,
                    max_positions(read_json(model_dir / "config.json") or {}), host, port, max_batch, log_requests)
    finally:
        shutdown_distributed()


def load_stage(run: RunSpec, env: DistEnv, device: torch.device) -> StageState:
    """This rank's part of the model for serving: its pipeline stage (the whole model on one rank), or its
    DeepSpeed AutoTP shard of every layer."""
    from distinfer.layout import split_layers
    from distinfer.models.families import family_of
    from distinfer.models.loading import load_stage_model
    from distinfer.models.profiles import model_layer_count
    from distinfer.runtime.engines import maybe_quantized
    from distinfer.serving.stages import StageState

    model_dir = Path(run.model_path)
    if capabilities(run.engine).deepspeed_config:
        from distinfer.plan import deepspeed_config
        from distinfer.runtime.tensor import deepspeed_model

        model = deepspeed_model(model_dir, deepspeed_config(run), env, device, run.trust_remote_code)
        return StageState(model.eval(), family_of(model), device, True, True, groups_of(run))
    layout = split_layers(model_layer_count(model_dir), run.pp, run.layers)[env.rank]
    model, family = load_stage_model(model_dir, layout, run.dtype, device, run.trust_remote_code)
    return StageState(maybe_quantized(model, run), family, device, layout.is_first, layout.is_last, groups_of(run))


def _serve_http(run: RunSpec, stage, link, peers, tokenizer, eos: tuple[int, ...],  # noqa: ANN001
                positions: int | None, host: str, port: int, max_batch: int, log_requests: bool) -> None:
    import uvicorn

    from distinfer.runtime.monitor import gpu_facts
    from distinfer.serving.engine import ServingEngine
    from distinfer.serving.server import create_app

    engine = ServingEngine(stage, link, eos, max_batch, positions, peers)
    device = stage.device
    facts = {"device": str(device), "hostname": os.uname().nodename, "world_size": run.world_size,
             "tokenizer": str(Path(run.model_path).resolve()),
             **gpu_facts(device.index if device.type == "cuda" else None)}
    _log_to_stderr()

    def run_engine() -> None:
        engine.run_forever()
        if engine.failure is not None:  # a stage went away: the server stops instead of hanging
            os.kill(os.getpid(), signal.SIGTERM)

    worker = threading.Thread(target=run_engine, name="engine", daemon=True)
    worker.start()
    # uvicorn catches SIGINT/SIGTERM while it serves and raises the signal again once it has shut down: with
    # these handlers that ends here and the engine stops its stages before the process exits.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    try:
        app = create_app(engine, tokenizer, served_name(run), facts, os.environ.get(API_KEY_ENV) or None,
                         log_requests)
        logging.getLogger("distinfer.server").info(
            "serving %s as %r on http://%s:%d (%s, %d rank(s)%s)", run.run_id, served_name(run), host, port, device,
            run.world_size, ", API key required" if os.environ.get(API_KEY_ENV) else "")
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    finally:
        engine.stop()
        worker.join(timeout=30)
    if engine.failure is not None:
        raise RuntimeError(f"the serving engine stopped: {engine.failure}")


def _log_to_stderr() -> None:
    """The server's own lines (start, refused or failed requests, throughput while busy, shutdown) on stderr."""
    logger = logging.getLogger("distinfer.server")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main() -> None:
    """`python -m distinfer.serving.serve RUN [--host H] --port P`: the server of a run (RUN: its bundle folder
    or a run.json), as a serving run's runner, `distinfer serve` and the Slurm job start it."""
    import argparse

    from distinfer.bundle import RunBundle, read_json
    from distinfer.quiet import route_third_party_logs

    parser = argparse.ArgumentParser(description="serve one run's model")
    parser.add_argument("run", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch", type=int, default=None)
    parser.add_argument("--ranks-per-node", type=int, default=None, help="ranks this node starts (Slurm)")
    parser.add_argument("--rendezvous", default=None, help="HOST:PORT where the ranks meet (Slurm)")
    parser.add_argument("--log-requests", action="store_true", help="one log line per request")
    args = parser.parse_args()
    route_third_party_logs()
    run_json = args.run if args.run.is_file() else RunBundle(args.run).run_json
    run = RunSpec.from_dict((read_json(run_json) or {})["run"])
    serve(run, args.host, args.port, args.max_batch or run.load_settings.max_batch,
          args.ranks_per_node, args.rendezvous, run_json.resolve(), args.log_requests)
    if "RANK" in os.environ and run.world_size > 1:
        _leave_cleanly()


def _leave_cleanly() -> None:
    """End a rank of a multi-rank server that has stopped cleanly (its requests answered, its process group
    destroyed) without running C++ static destructors: a joinable thread of a communication library destroyed
    there ends the process with SIGABRT ("terminate called without an active exception"), in about one of
    seven DeepSpeed tensor-parallel shutdowns on CPU, which would report a clean stop as a failed one."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
