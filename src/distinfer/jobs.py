"""A study on Slurm: plan (memory fit + job scripts), submit what is unfinished, track, cancel, collect."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

from distinfer.bundle import RunBundle, atomic_write_json, read_json
from distinfer.launchers.slurm import SlurmLauncher
from distinfer.layout import split_layers
from distinfer.memory import MemoryEstimate, ModelFacts, estimate_stage_memory
from distinfer.plan import RunSpec, expand, resolve_builtin_models
from distinfer.profiles import HARDWARE
from distinfer.prompts import CHARS_PER_TOKEN, load_prompts
from distinfer.slurm import sacct_records, scancel, squeue_states
from distinfer.spec_schema import Experiment, resolve_path

LIVE_STATES = {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "REQUEUED", "RESIZING"}


@dataclass(frozen=True)
class PlannedRun:
    run: RunSpec
    bundle: RunBundle
    memory: list[MemoryEstimate]  # one per rank; empty when the model's config is not readable here

    @property
    def fits(self) -> bool:
        return all(m.fits for m in self.memory)


@functools.cache
def _longest_prompt_chars(prompts_file: str) -> int:
    return max(len(p.prompt) for p in load_prompts(Path(prompts_file)))


def context_tokens(run: RunSpec) -> int:
    """Prompt tokens (max_prompt_tokens, else the longest prompt at CHARS_PER_TOKEN) + new tokens."""
    prompt = run.generation.max_prompt_tokens
    if prompt is None:
        prompt = _longest_prompt_chars(run.prompts) // CHARS_PER_TOKEN + 1
    return int(prompt) + run.generation.max_new_tokens


def estimate_run(run: RunSpec, facts: ModelFacts, exp: Experiment) -> list[MemoryEstimate]:
    profile = HARDWARE[exp.cluster.profile]
    stages = split_layers(facts.layers, run.pp, run.layers)  # the engines that take no stages have pp 1
    ctx = context_tokens(run)
    batch = run.max_batch  # a server's running batch, or the offline batch
    per_stage = [estimate_stage_memory(facts, s, run.dtype, batch, ctx, profile.memory_bytes, profile.gpu,
                                       run.quantization, run.tp, run.ep) for s in stages]
    ranks = max(run.tp, run.ep)
    return [memory for memory in per_stage for _ in range(ranks)]  # one per rank: a stage's ranks alike


def plan_experiment(exp: Experiment, spec_file: Path, outputs: Path, write: bool = True) -> list[PlannedRun]:
    """Expand, estimate memory per rank, and (with `write`) write run.json + job.sbatch for every run that fits."""
    runs = resolve_builtin_models(expand(exp, spec_file))
    config = read_json(Path(runs[0].model_path) / "config.json") if runs else None
    if config is None and exp.model.config:
        config = read_json(resolve_path(exp.model.config, spec_file))
    launcher = SlurmLauncher(outputs, exp.cluster, exp.container)
    planned = []
    for run in runs:
        bundle = launcher.bundle(run)
        memory = estimate_run(run, ModelFacts.from_config(config), exp) if config else []
        item = PlannedRun(run, bundle, memory)
        if write and item.fits and not bundle.is_done(run.config_hash()):  # a finished run keeps the files it ran with
            launcher.prepare(run)
        planned.append(item)
    return planned


def jobs_file(outputs: Path, experiment: str) -> Path:
    return outputs / experiment / "jobs.json"


def load_jobs(outputs: Path, experiment: str) -> dict[str, dict]:
    return read_json(jobs_file(outputs, experiment)) or {}


def submit(planned: list[PlannedRun], launcher: SlurmLauncher, experiment: str, force: bool = False,
           dry_run: bool = False) -> list[tuple[str, str, str | None]]:
    """Submit every fitting run without an ok summary (and without a live job); (run_id, action, job_id)."""
    outputs = launcher.outputs
    jobs = load_jobs(outputs, experiment)
    live = squeue_states([j["job_id"] for j in jobs.values()]) if jobs and not dry_run else {}
    actions: list[tuple[str, str, str | None]] = []
    for item in planned:
        run_id = item.run.run_id
        previous = jobs.get(run_id, {}).get("job_id")
        if not item.fits:
            actions.append((run_id, "does not fit", None))
        elif item.bundle.is_done(item.run.config_hash()) and not force:
            actions.append((run_id, "done", previous))
        elif previous in live and live[previous] in LIVE_STATES:
            actions.append((run_id, f"already {live[previous].lower()}", previous))
        elif dry_run:
            actions.append((run_id, "would submit", None))
        else:
            job_id = launcher.launch(item.run, item.bundle)
            history = jobs.get(run_id, {}).get("history", []) + ([previous] if previous else [])
            jobs[run_id] = {"job_id": job_id, "submitted_at": time.time(), "history": history}
            atomic_write_json(jobs_file(outputs, experiment), jobs)
            actions.append((run_id, "resubmitted" if previous else "submitted", job_id))
    return actions


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    job_id: str | None
    slurm_state: str
    bundle_state: str  # ok | failed | ... | unfinished | not started


def bundle_state(bundle: RunBundle) -> str:
    summary = bundle.summary()
    if summary:
        return str(summary.get("status"))
    return "unfinished" if bundle.completions.exists() or bundle.rank_log(0).exists() else "not started"


def status(outputs: Path, experiment: str) -> list[RunStatus]:
    """Each run's Slurm state (squeue while live, sacct after) beside its bundle's state."""
    jobs = load_jobs(outputs, experiment)
    ids = [j["job_id"] for j in jobs.values()]
    live = squeue_states(ids)
    done = sacct_records([i for i in ids if i not in live])
    rows = []
    for run_dir in sorted(p for p in (outputs / experiment).iterdir() if (p / "run.json").is_file()):
        job_id = jobs.get(run_dir.name, {}).get("job_id")
        state = live.get(job_id) or done.get(job_id, {}).get("State") or ("UNKNOWN" if job_id else "-")
        rows.append(RunStatus(run_dir.name, job_id, state.split()[0], bundle_state(RunBundle(run_dir))))
    return rows


def cancel(outputs: Path, experiment: str) -> list[str]:
    """Cancel the experiment's jobs that are still queued or running."""
    jobs = load_jobs(outputs, experiment)
    live = squeue_states([j["job_id"] for j in jobs.values()])
    ids = [i for i, state in live.items() if state in LIVE_STATES]
    scancel(ids)
    return ids


def collect(outputs: Path, experiment: str) -> int:
    """Store each finished job's accounting record as slurm.json in its run's bundle; returns how many."""
    jobs = load_jobs(outputs, experiment)
    records = sacct_records([j["job_id"] for j in jobs.values()])
    count = 0
    for run_id, job in jobs.items():
        record = records.get(job["job_id"])
        if record:
            atomic_write_json(outputs / experiment / run_id / "slurm.json", {"job_id": job["job_id"], **record})
            count += 1
    return count
