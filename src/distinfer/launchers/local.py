"""Run an experiment's matrix on this machine: one local torchrun (gloo on CPU) per run, same worker as on Slurm."""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distinfer.bundle import RunBundle
from distinfer.engines import capabilities
from distinfer.finalize import finalize_run
from distinfer.launchers.base import Launcher
from distinfer.plan import RunSpec, resolve_builtin_models


@dataclass(frozen=True)
class RunResult:
    run: RunSpec
    bundle: RunBundle
    state: str  # ok | failed | cancelled | timeout (summary.json's status) | skipped (already ok)
    summary: dict | None
    seconds: float

    @property
    def succeeded(self) -> bool:
        return self.state in ("ok", "skipped")


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a local worker: offline Hugging Face, quiet tokenizers, and no GPU. A local run is the
    CPU dry run of the cluster's pipeline (gloo); on a machine with fewer GPUs than ranks a visible GPU would
    send rank 1 to a device that does not exist."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    env.update(extra or {})
    return env


def scratch_env(scratch: str) -> dict[str, str]:
    """TMPDIR set to `scratch`, with PyTorch's compile cache (TORCHINDUCTOR_CACHE_DIR) left where it would be
    without it, so that compiled kernels outlive the folder."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container's)
        user = str(os.getuid())
    inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(tempfile.gettempdir(), f"torchinductor_{user}")
    return {"TMPDIR": scratch, "TORCHINDUCTOR_CACHE_DIR": inductor}


def torchrun_command(run: RunSpec, bundle: RunBundle) -> list[str]:
    """The ranks under a local torchrun; a serving run, and any run of engine vllm, is one load-generator
    process (which starts the run's server)."""
    if run.serving or capabilities(run.engine).program != "ranks":
        return [sys.executable, "-m", "distinfer.serving", str(bundle.root)]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
        "--nproc-per-node", str(run.world_size),
        "-m", "distinfer.runtime", str(bundle.root),
    ]


class LocalLauncher(Launcher):
    """One local torchrun per run (gloo on CPU), waited for; launcher output goes to launcher.log."""

    name = "local"

    def launch(self, run: RunSpec, bundle: RunBundle) -> str:
        """The run's processes see a temporary folder of their own (TMPDIR), removed when they end (not if this
        process is killed by a signal): what they leave there (torchrun's folders, vLLM's sockets) goes with it.
        Compile caches keep their usual place."""
        with (tempfile.TemporaryDirectory(prefix="distinfer-run-") as scratch,
              (bundle.root / "launcher.log").open("w") as log):
            proc = subprocess.run(torchrun_command(run, bundle), stdout=log, stderr=subprocess.STDOUT,
                                  env=worker_env(scratch_env(scratch)), check=False)
        summary = finalize_run(bundle.root, proc.returncode)
        return str(summary.get("status", "failed")) if summary else "failed"

    def run(self, run: RunSpec) -> RunResult:
        """Archive an earlier attempt, write the definition, run, and read the outcome."""
        bundle = self.bundle(run)
        bundle.root.mkdir(parents=True, exist_ok=True)
        bundle.archive_attempt()
        bundle = self.prepare(run)
        start = time.perf_counter()
        state = self.launch(run, bundle)
        return RunResult(run, bundle, state, bundle.summary(), time.perf_counter() - start)


def run_local(
    runs: list[RunSpec],
    outputs: Path,
    force: bool = False,
    on_start: Callable[[RunSpec], None] | None = None,
    on_done: Callable[[RunResult], None] | None = None,
) -> list[RunResult]:
    """Run every run not already finished ok (all with `force`), one after another."""
    launcher = LocalLauncher(outputs)
    results = []
    for run in resolve_builtin_models(runs):
        bundle = launcher.bundle(run)
        if bundle.is_done(run.config_hash()) and not force:
            result = RunResult(run, bundle, "skipped", bundle.summary(), 0.0)
        else:
            if on_start:
                on_start(run)
            result = launcher.run(run)
        results.append(result)
        if on_done:
            on_done(result)
    return results
