"""`distinfer serve`: one run's model behind the OpenAI-compatible server, in the foreground until SIGINT/SIGTERM.

Serves one-rank layouts (the reference, or a one-stage pipeline) on this machine's device: the whole model,
continuous batching (engine.py), uvicorn on the given host and port.
"""

from __future__ import annotations

import threading
from pathlib import Path

from distinfer.plan import RunSpec


def served_name(run: RunSpec) -> str:
    """The model name clients ask for: the built-in model's, else the model folder's."""
    return run.builtin or Path(run.model_path).name


def serve(run: RunSpec, host: str, port: int, max_batch: int = 32) -> None:
    import torch
    import uvicorn

    from distinfer.bundle import read_json
    from distinfer.models.loading import load_full_model, load_tokenizer
    from distinfer.models.profiles import max_positions
    from distinfer.runtime.worker import stop_rule
    from distinfer.serving.engine import BatchingEngine
    from distinfer.serving.server import create_app

    if run.world_size != 1:
        raise ValueError(f"{run.run_id} has {run.world_size} ranks; `distinfer serve` serves one-rank layouts "
                         "(the reference, or pipeline pp 1)")
    model_dir = Path(run.model_path)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    tokenizer = load_tokenizer(model_dir, run.trust_remote_code)
    model = load_full_model(model_dir, run.dtype, device, run.trust_remote_code)
    if run.quantization == "int8":
        from distinfer.models.quantize import quantize_int8_weights

        model = quantize_int8_weights(model)
    stop = stop_rule(model_dir, tokenizer, 1)
    engine = BatchingEngine(model, device, stop.eos_token_ids, max_batch,
                            max_positions(read_json(model_dir / "config.json") or {}))
    worker = threading.Thread(target=engine.run_forever, name="engine", daemon=True)
    worker.start()
    try:
        uvicorn.run(create_app(engine, tokenizer, served_name(run)), host=host, port=port, log_level="warning",
                    timeout_graceful_shutdown=5)
    finally:
        engine.stop()
        worker.join(timeout=10)


def main() -> None:
    """`python -m distinfer.serving.serve RUN_DIR --port P`: the server of a serving run (started by its runner)."""
    import argparse

    from distinfer.bundle import RunBundle, read_json
    from distinfer.quiet import route_third_party_logs

    parser = argparse.ArgumentParser(description="serve one run's model")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    route_third_party_logs()
    run = RunSpec.from_dict((read_json(RunBundle(args.run_dir).run_json) or {})["run"])
    serve(run, args.host, args.port, int((run.scenario or {}).get("max_batch", 32)))


if __name__ == "__main__":
    main()
