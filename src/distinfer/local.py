"""Run an experiment's matrix on this machine: one local torchrun (gloo on CPU) per run, same worker as on Slurm."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distinfer.bundle import BUNDLE_SCHEMA, RunBundle, atomic_write_json
from distinfer.finalize import finalize_run
from distinfer.plan import RunSpec, deepspeed_config
from distinfer.provenance import provenance


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


def resolve_builtin_models(runs: list[RunSpec]) -> list[RunSpec]:
    """Build (or reuse from the cache) the built-in models the runs name, and point the runs at them."""
    from distinfer.models.tiny import build_tiny_model

    built: dict[str, str] = {}
    resolved = []
    for run in runs:
        if run.builtin:
            if run.builtin not in built:
                built[run.builtin] = str(build_tiny_model(run.builtin))
            run = dataclasses.replace(run, model_path=built[run.builtin])
        resolved.append(run)
    return resolved


def write_run_json(run: RunSpec, outputs: Path) -> RunBundle:
    """outputs/<experiment>/<run_id>/run.json: the run, its config hash and where it was planned."""
    bundle = RunBundle(outputs / run.experiment / run.run_id)
    atomic_write_json(
        bundle.run_json, {"schema": BUNDLE_SCHEMA, "run": run.to_dict(), "config_hash": run.config_hash(),
                          "provenance": provenance(os.environ)}
    )
    if run.engine == "deepspeed":
        atomic_write_json(bundle.root / "ds_config.json", deepspeed_config(run))
    return bundle


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a local worker: offline Hugging Face, quiet tokenizers, and no GPU. A local run is the
    CPU dry run of the cluster's pipeline (gloo); on a machine with fewer GPUs than ranks a visible GPU would
    send rank 1 to a device that does not exist."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    env.update(extra or {})
    return env


def torchrun_command(run: RunSpec, bundle: RunBundle) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
        "--nproc-per-node", str(run.world_size),
        "-m", "distinfer.runtime", str(bundle.root),
    ]


def run_one(run: RunSpec, outputs: Path) -> RunResult:
    """Launch one run with torchrun and wait for it; launcher output goes to launcher.log."""
    bundle = RunBundle(outputs / run.experiment / run.run_id)
    bundle.root.mkdir(parents=True, exist_ok=True)
    bundle.archive_attempt()
    bundle = write_run_json(run, outputs)
    start = time.perf_counter()
    with (bundle.root / "launcher.log").open("w") as log:
        proc = subprocess.run(torchrun_command(run, bundle), stdout=log, stderr=subprocess.STDOUT,
                              env=worker_env(), check=False)
    summary = finalize_run(bundle.root, proc.returncode)
    state = str(summary.get("status", "failed")) if summary else "failed"
    return RunResult(run, bundle, state, summary, time.perf_counter() - start)


def run_local(
    runs: list[RunSpec],
    outputs: Path,
    force: bool = False,
    on_start: Callable[[RunSpec], None] | None = None,
    on_done: Callable[[RunResult], None] | None = None,
) -> list[RunResult]:
    """Run every run not already finished ok (all with `force`), one after another."""
    results = []
    for run in resolve_builtin_models(runs):
        bundle = RunBundle(outputs / run.experiment / run.run_id)
        if bundle.is_done(run.config_hash()) and not force:
            result = RunResult(run, bundle, "skipped", bundle.summary(), 0.0)
        else:
            if on_start:
                on_start(run)
            result = run_one(run, outputs)
        results.append(result)
        if on_done:
            on_done(result)
    return results
