"""Engine vllm: `vllm serve` for a run, the engine users deploy, measured by distinfer's load generator.

vLLM lives in its own environment (it pins other transformers than distinfer) and is called as a separate
program: `<vllm python> -m vllm.entrypoints.cli.main serve MODEL ...` (the command line `vllm` runs, which picks
the CPU platform where there is no accelerator). The run's layout and precision become vLLM's arguments, the
experiment's `vllm` section adds the rest; a model without a chat template gets distinfer's plain one, so that
chat requests reach vLLM as they reach distinfer's server. The server runs in its own process group, is stopped through it
(SIGTERM, then SIGKILL), and the shared-memory files its ranks leave in /dev/shm and /tmp are removed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

from distinfer.plan import RunSpec
from distinfer.serving.serve import API_KEY_ENV
from distinfer.spec_schema import VllmSpec
from distinfer.tokencount import has_chat_template

PYTHON_ENV = "DISTINFER_VLLM_PYTHON"
LOCAL_VENV_PYTHON = Path(".venv-vllm") / "bin" / "python"  # `make vllm-env`
LEFTOVER_GLOBS = (("/dev/shm", "vllm_dist_*"), ("/tmp", "vllm_dist_*"))
STOP_WAIT_S = 30.0
# vLLM refuses chat requests for a model without a chat template; it gets distinfer's plain one (template.py)
PLAIN_CHAT_TEMPLATE = Path(__file__).resolve().parent / "static" / "plain-chat.jinja"


def vllm_python(run: RunSpec, environ: Mapping[str, str], cwd: Path | None = None) -> str:
    """The Python of vLLM's environment: the experiment's `vllm.python`, else $DISTINFER_VLLM_PYTHON, else
    .venv-vllm/bin/python in `cwd` (make vllm-env), else python3."""
    chosen = (run.vllm.python if run.vllm else None) or environ.get(PYTHON_ENV)
    if chosen:
        return str(chosen)
    local = (cwd or Path.cwd()) / LOCAL_VENV_PYTHON
    return str(local) if local.is_file() else "python3"


def on_cpu(environ: Mapping[str, str]) -> bool:
    """No GPU for this server: none visible (a local run hides them) or no NVIDIA driver on the machine."""
    return environ.get("CUDA_VISIBLE_DEVICES") == "" or not Path("/dev/nvidiactl").exists()


def eager(run: RunSpec, cpu: bool) -> bool:
    """--enforce-eager: as set, or (auto) on CPU unless the run has pipeline stages: vLLM's CPU pipeline fails
    its first request without compilation, and compiling one stage costs a minute or two of start-up."""
    choice = run.vllm.enforce_eager if run.vllm else "auto"
    return (cpu and run.pp == 1) if choice == "auto" else bool(choice)


def max_seqs(run: RunSpec) -> int:
    """Sequences vLLM decodes together: the batch size offline, the scenario's max_batch when serving."""
    return run.max_batch


def serve_command(run: RunSpec, python: str, port: int, host: str = "127.0.0.1", cpu: bool = True) -> list[str]:
    """`vllm serve` for the run: its model, layout, precision and batch limit, then `vllm.args` as they are."""
    from distinfer.serving.serve import served_name

    settings = run.vllm or VllmSpec()
    command = [python, "-m", "vllm.entrypoints.cli.main", "serve", run.model_path, "--host", host, "--port",
               str(port), "--served-model-name", served_name(run), "--dtype", run.dtype,
               "--pipeline-parallel-size", str(run.pp), "--tensor-parallel-size", str(run.tp),
               "--max-num-seqs", str(max_seqs(run)), "--seed", str(run.generation.seed)]
    if settings.max_model_len:
        command += ["--max-model-len", str(settings.max_model_len)]
    if run.world_size > 1:
        command += ["--distributed-executor-backend", "mp"]
    if eager(run, cpu):
        command.append("--enforce-eager")
    args = [str(arg) for arg in settings.args]
    if not has_chat_template(Path(run.model_path)) and not any(a.startswith("--chat-template") for a in args):
        command += ["--chat-template", str(PLAIN_CHAT_TEMPLATE)]
    return command + args



def thread_binding(world_size: int, cores: list[int]) -> str:
    """VLLM_CPU_OMP_THREADS_BIND: the cores split evenly between the ranks ('0-3|4-7'), one each at least."""
    cores = sorted(cores)
    groups = []
    for rank in range(world_size):
        share = cores[rank * len(cores) // world_size: (rank + 1) * len(cores) // world_size] or \
            [cores[rank % len(cores)]]
        groups.append(",".join(map(str, share)))
    return "|".join(groups)


def server_env(run: RunSpec, environ: Mapping[str, str], cores: list[int]) -> dict[str, str]:
    """The server's environment: offline, no usage reports; on CPU a 1 GiB KV cache and each rank on its own
    cores unless set; explicit layer counts as vLLM's partition; then the experiment's `vllm.env`."""
    env = dict(environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if run.world_size > 1:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", thread_binding(run.world_size, cores))
    if run.layers:
        env["VLLM_PP_LAYER_PARTITION"] = ",".join(map(str, run.layers))
    env.update(run.vllm.env if run.vllm else {})
    if environ.get(API_KEY_ENV):  # vllm serve asks clients of /v1 for $VLLM_API_KEY
        env["VLLM_API_KEY"] = environ[API_KEY_ENV]
    return env


def leftovers() -> set[Path]:
    """vLLM's shared-memory files of multi-rank servers (compare before and after a server to find its own)."""
    return {path for folder, pattern in LEFTOVER_GLOBS for path in Path(folder).glob(pattern)}


def remove(paths: set[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


def stop_group(process: subprocess.Popen, wait_s: float = STOP_WAIT_S) -> None:
    """SIGTERM to the process group `process` leads, SIGKILL after `wait_s`, and SIGKILL to ranks that outlived
    their leader."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def exec_server(run_dir: Path, port: int, host: str, nodes: int = 1, node_rank: int = 0,
                master: str | None = None) -> None:
    """Become the run's `vllm serve` (this node's part of it, with `nodes` > 1): the command and the settings
    of vLLM's environment go to vllm.json in the bundle first."""
    from distinfer.bundle import atomic_write_json, read_json

    run = RunSpec.from_dict((read_json(run_dir / "run.json") or {})["run"])
    cpu = on_cpu(os.environ)
    command = serve_command(run, vllm_python(run, os.environ), port, host=host, cpu=cpu)
    if nodes > 1:  # vLLM's own multi-node launch: every node runs the command, the others without HTTP
        address, _, master_port = (master or "").partition(":")
        command += ["--nnodes", str(nodes), "--node-rank", str(node_rank), "--master-addr", address]
        command += ["--master-port", master_port] if master_port else []
        command += ["--headless"] if node_rank > 0 else []
    env = server_env(run, os.environ, sorted(os.sched_getaffinity(0)))
    if node_rank == 0:
        settings = {k: v for k, v in env.items() if k.startswith("VLLM_") and k != "VLLM_API_KEY"}
        atomic_write_json(run_dir / "vllm.json", {"command": command, "env": settings, "device": "cpu" if cpu else
                                                  "cuda", "host": os.uname().nodename})
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        raise SystemExit(f"cannot start vLLM ({command[0]}): {exc.strerror}; create its environment with `make "
                         f"vllm-env`, or set vllm.python (or ${PYTHON_ENV}) to the Python that has vLLM") from None


def main() -> None:
    """`python -m distinfer.serving.vllm RUN_DIR --port P`: the run's vLLM server (started by the run's load
    process, or on Slurm once per node by the job script)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m distinfer.serving.vllm", description="start a run's vllm serve")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--master", default=None, help="HOST:PORT of node 0, where vLLM's ranks meet")
    args = parser.parse_args()
    exec_server(args.run_dir, args.port, args.host, args.nnodes, args.node_rank, args.master)


if __name__ == "__main__":
    main()
