"""Shared fixtures: the built-in tiny models (built offline once, cached) and a spawned-ranks runner."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from distinfer.net import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the bench scripts (`bench.*`) that tests use as fixtures


# Modules whose tests start ranks, servers, torchrun or Slurm daemons, or run whole studies: `make test` runs
# them, `make test-fast` (pytest -m "not slow") leaves them out.
SLOW_MODULES = {"test_analysis", "test_client_nodes", "test_compare", "test_local_run", "test_parallel_layouts",
                "test_pipeline_exact", "test_serve", "test_serving", "test_shm_ring", "test_slurm", "test_vllm"}


def pytest_collection_modifyitems(items: list) -> None:
    """Mark the slow modules, and run the other tests first: meanwhile the C++ ops that ranks compile at first
    use are built in the background (`prebuild`), which the slow tests wait for."""
    for item in items:
        if item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)  # stable: file order kept within


PREBUILD: list = []  # the background build of the ops, while one runs


def pytest_collection_finish(session: pytest.Session) -> None:
    """Where slow tests are selected, compile the ops of CPU ranks (runtime/cpu/prebuild.py) on one core while the
    fast tests run; a fresh installation spends about a minute on it, once."""
    import subprocess

    if any(item.get_closest_marker("slow") for item in session.items) and not session.config.option.collectonly:
        PREBUILD.append(subprocess.Popen([sys.executable, "-m", "distinfer.runtime.cpu.prebuild"],
                                         env={**os.environ, "MAX_JOBS": "1"}, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL))


def _end_prebuild(wait_s: float) -> None:
    import subprocess

    for proc in PREBUILD:
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    PREBUILD.clear()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if PREBUILD and item.get_closest_marker("slow"):  # timed and multi-rank tests run on a quiet machine
        _end_prebuild(900)


def pytest_sessionfinish(session: pytest.Session) -> None:
    _end_prebuild(0)


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    from distinfer.models.tiny import build_tiny_model

    return {name: build_tiny_model(name) for name in ("tiny-llama", "tiny-gpt2")}


@pytest.fixture(scope="session")
def local_study(tmp_path_factory, tiny_models) -> Path:  # noqa: ANN001
    """One real local study shared by the local-run and analysis tests, run as a user runs it (`distinfer run
    --local` in a subprocess): experiment `t` on the tiny Llama, 8 new tokens, batch 4, the reference and
    pipeline pp 1 and 2 with two micro-batches (e.yaml), then DeepSpeed tp 2 into the same experiment from a
    second file (ds.yaml). Beside the outputs: what /dev/shm and /tmp held before and after, and whether a stale
    op-build lock planted before the DeepSpeed run was left."""
    import json

    from bench.experiments import experiment_file, run_local
    from distinfer.runtime.extensions import extensions_dir

    work = tmp_path_factory.mktemp("study")

    def run(name: str, body: str) -> None:
        config = experiment_file(work / name, "t", generation={"max_new_tokens": 8}, batch_size=4, body=body)
        proc = run_local(config, cwd=work, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    (work / "shm-before.json").write_text(json.dumps(sorted(p.name for p in Path("/dev/shm").glob("deepspeed_*"))))
    (work / "tmp-before.json").write_text(json.dumps(sorted(str(p) for p in left_in_tmp())))
    run("e.yaml", "parallel: {engine: [reference, pipeline], pp: [1, 2], microbatches: 2}\n")
    # What a killed build of DeepSpeed's CPU all-reduce op leaves behind; without distinfer's clean-up every later
    # load of the op waits for this file to go, and the run would time out.
    stale_lock = extensions_dir() / "deepspeed_shm_comm" / "lock"
    stale_lock.parent.mkdir(parents=True, exist_ok=True)
    stale_lock.touch()
    try:
        run("ds.yaml", "parallel: {engine: deepspeed, tp: 2}\nreference: none\n")
    finally:
        (work / "stale-lock-left.json").write_text(json.dumps(stale_lock.exists()))
        stale_lock.unlink(missing_ok=True)
    (work / "tmp-after.json").write_text(json.dumps(sorted(str(p) for p in left_in_tmp())))
    return work


def spawn_ranks(model_dir: Path, cases: dict[int, list], max_new: int, timeout: float = 300) -> dict:
    """Run {world: cases} on max(world) spawned gloo ranks (pp_harness.py); {world: {case index: result}}.
    Always joins or kills the children."""
    import torch.multiprocessing as mp
    from pp_harness import rank_main

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = mp.start_processes(rank_main, args=(free_port(), str(model_dir), cases, max_new, queue),
                               nprocs=max(cases), start_method="spawn", join=False)
    try:
        results = queue.get(timeout=timeout)
        while not procs.join(timeout=60):
            pass
        return results
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
                p.join()


SLURM_SCRIPT = REPO / "scripts" / "local-slurm.sh"
SLURM_ENV = {"SLURM_LOCAL_DIR": "/tmp/distinfer-test-slurm", "SLURM_LOCAL_PORT": "17817", "SLURM_LOCAL_NODES": "2"}


@pytest.fixture(scope="session")
def slurm() -> dict[str, str]:
    """A real two-node Slurm cluster on localhost, in its own state folder and ports; needs root.

    Started by scripts/local-slurm.sh and stopped again by the PIDs in its PID files, also when a test fails;
    its state folder in /tmp is removed once the daemons are down.
    """
    import shutil
    import subprocess

    env = {**os.environ, **SLURM_ENV}
    job_folders = set(Path("/tmp").glob("distinfer-job-*"))  # what a cancelled job leaves (its script is killed)
    up = subprocess.run(["bash", str(SLURM_SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=300)
    if "already up" in up.stderr:  # another test session's cluster: use it, and leave it to that session to stop
        env["SLURM_CONF"] = f"{SLURM_ENV['SLURM_LOCAL_DIR']}/slurm.conf"
        yield env
        return
    try:
        assert up.returncode == 0, up.stderr
        env["SLURM_CONF"] = f"{SLURM_ENV['SLURM_LOCAL_DIR']}/slurm.conf"
        yield env
    finally:
        down = subprocess.run(["bash", str(SLURM_SCRIPT), "down"], env=env, capture_output=True, text=True,
                              timeout=300)
        if down.returncode == 0:
            shutil.rmtree(SLURM_ENV["SLURM_LOCAL_DIR"], ignore_errors=True)
        for folder in set(Path("/tmp").glob("distinfer-job-*")) - job_folders:
            shutil.rmtree(folder, ignore_errors=True)


def run_processes(run_dir: Path) -> dict[int, list[bytes]]:
    """PID -> environment of every live process (torchrun or rank) working on the run at `run_dir`."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            cwd = Path(os.readlink(proc / "cwd"))
            if b"distinfer.runtime" in args and any((cwd / a.decode()).resolve() == run_dir.resolve()
                                                    for a in args if a and b"\n" not in a):
                found[int(proc.name)] = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
    return found


def rank_pid(run_dir: Path, rank: int) -> int | None:
    """PID of the worker process of `rank` in the run at `run_dir`, or None."""
    return next((pid for pid, env in run_processes(run_dir).items() if f"RANK={rank}".encode() in env), None)


def kill_run(run_dir: Path) -> None:
    """SIGKILL whatever still works on the run (torchrun puts its ranks in their own sessions, so killing the
    launcher's process group does not reach them), then remove the temporary folder the run's processes had
    (the launcher, killed, could not)."""
    import shutil
    import signal

    scratch = run_scratch(run_dir)
    for pid in run_processes(run_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for folder in scratch:
        shutil.rmtree(folder, ignore_errors=True)


def run_scratch(run_dir: Path) -> set[str]:
    """The temporary folders (TMPDIR) of the processes working on a local run: its launcher removes it when it
    ends, which a launcher killed by a signal cannot."""
    prefix = b"TMPDIR=/tmp/distinfer-run-"
    return {v[len(b"TMPDIR="):].decode() for environ in run_processes(run_dir).values() for v in environ
            if v.startswith(prefix)}


def wait_for_first_completion(run_dir: Path, timeout: float = 180) -> None:
    """Block until the run has written at least one completion line (it is generating)."""
    import time

    completions = run_dir / "completions.jsonl"
    deadline = time.monotonic() + timeout
    while not (completions.is_file() and completions.read_text().strip()):
        assert time.monotonic() < deadline, "no completions appeared"
        time.sleep(0.1)


UUID_NAME = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def left_in_tmp() -> set[Path]:
    """What a run's processes could leave in /tmp: torchrun's folders, vLLM's files and sockets (named by a
    UUID), the runs' own temporary folders. Compare before and after a run."""
    return {p for p in Path("/tmp").iterdir()
            if p.name.startswith(("torchelastic_", "distinfer-run-", "distinfer-job-", "vllm_dist_"))
            or UUID_NAME.fullmatch(p.name)}
