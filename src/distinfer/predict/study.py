"""Predictions for a whole experiment: the machine its runs would use, each run's prediction, the best layouts for
a goal, and the assumptions to print beside them."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from distinfer.bundle import read_json
from distinfer.engines import capabilities
from distinfer.memory import ModelFacts
from distinfer.predict.calibrate import load_calibration, one_rank
from distinfer.predict.hardware import LINKS, load_hardware_file
from distinfer.predict.model import Efficiency, Machine, Prediction, fit_used
from distinfer.predict.workload import prompt_lengths
from distinfer.profiles import HARDWARE, HardwareProfile
from distinfer.spec_schema import Experiment

GOALS = ("tokens_per_s", "tpot", "cost")


@dataclass
class Predicted:
    run: object  # plan.RunSpec
    prediction: Prediction | None  # None: not predicted (an endpoint run: someone else's server)
    fits: bool
    exact_prompts: bool = True

    @property
    def gpu_hours_per_million_tokens(self) -> float | None:
        p = self.prediction
        if p is None or not p.output_tokens_per_s:
            return None
        return self.run.world_size / p.output_tokens_per_s / 3600 * 1e6


CpuProbe = Callable[[], dict]  # this machine's CPU figures (probes/cpu.py), measured by the caller's probe


def _probed(cpu_probe: CpuProbe | None) -> dict:
    if cpu_probe is None:
        raise ValueError("a CPU prediction needs the machine's probe (probes/cpu.py), which was not given")
    return cpu_probe()


def machine_for(exp: Experiment, hardware: Path | None = None, cpu_probe: CpuProbe | None = None) -> Machine:
    """The experiment's cluster as the model sees it. The CPU profile takes this machine's probe and places the
    ranks as `run --local` does: all on this machine."""
    profile: HardwareProfile = load_hardware_file(hardware) if hardware else HARDWARE[exp.cluster.profile]
    probe = None if profile.gpu else _probed(cpu_probe)
    return Machine(profile, LINKS[exp.cluster.network], probe, local=not profile.gpu,
                   gpus_per_node=max(1, exp.cluster.gpus_per_node), nodes=exp.cluster.nodes)


def efficiency_for(calibration: Path | None) -> tuple[dict[str, Efficiency], str]:
    """The efficiencies to predict with, and where they came from: a calibration file, or the defaults."""
    if calibration is not None:
        fits = (read_json(calibration) or {}).get("fit") or {}
        untrusted = [f"{engine}: {'; '.join(fit.get('warnings') or [])}" for engine, fit in fits.items()
                     if isinstance(fit, dict) and fit.get("trusted") is False]
        note = f" (WARNING, fit not trusted: {' | '.join(untrusted)})" if untrusted else ""
        return load_calibration(calibration), f"calibration file {calibration}{note}"
    d = Efficiency()
    return {}, (f"uncalibrated: default efficiencies (compute {d.compute:g} in decode, {d.prefill:g} in "
                f"prefill, memory {d.memory:g} of peak; "
                f"{d.step_s * 1e3:g} ms a forward, {d.batch_s * 1e3:g} ms a batch, {d.cycle_s * 1e3:g} ms a step; "
                f"a server's {d.serve_step_s * 1e3:g} ms a step, {d.serve_token_s * 1e6:g} us a token, "
                f"{d.serve_request_s * 1e3:g} ms a request)")


def predict_runs(runs: list, facts: ModelFacts, machine: Machine, efficiency: dict[str, Efficiency],
                 fits: dict[str, bool] | None = None) -> list[Predicted]:
    from distinfer.predict.serving import predict_any

    out = []
    for run in runs:
        if capabilities(run.engine).program == "endpoint":  # someone else's server
            out.append(Predicted(run, None, True))
            continue
        lengths, exact = prompt_lengths(run)
        out.append(Predicted(run, predict_any(run, facts, machine, efficiency, lengths),
                             (fits or {}).get(run.run_id, True), exact))
    return out


def best(items: list[Predicted], goal: str) -> Predicted | None:
    """The run that fits and does best on the goal: most tokens/s, least TPOT, least GPU-hours per 1M tokens."""
    usable = [i for i in items if i.prediction is not None and i.fits
              and not capabilities(i.run.engine).single_device] or \
             [i for i in items if i.prediction is not None and i.fits]
    if not usable:
        return None
    key = {"tokens_per_s": lambda i: -i.prediction.output_tokens_per_s, "tpot": lambda i: i.prediction.tpot_s,
           "cost": lambda i: i.gpu_hours_per_million_tokens or math.inf}[goal]
    return min(usable, key=key)


def assumptions(machine: Machine, source: str, items: list[Predicted]) -> list[str]:
    profile = machine.profile
    lines = [f"efficiencies: {source}"]
    if machine.probe:
        p = machine.probe
        lines.append(f"device: this machine's CPU, measured {p['measured']}: {p['cores']} cores, "
                     f"{p['flops_all']['float32'] / 1e9:.0f} GFLOP/s fp32, reads {p['read_all'][0][1] / 1e9:.0f} GB/s (cache) to "
                     f"{p['read_all'][-1][1] / 1e9:.0f} GB/s (memory), "
                     f"{p['launch_s'] * 1e6:.1f} us an operation, {p.get('wake_s', 0) * 1e6:.0f} us a wake-up")
        lines.append("ranks: all on this machine, sharing its cores as `run --local` places them")
        if p.get("disturbed"):
            lines.append(f"WARNING: the CPU probe was taken while the machine was busy ({p['disturbed']}); its figures "
                         "and every prediction from them may be off: `distinfer predict CONFIG --probe` on a quiet "
                         "machine measures again")
    else:
        flops = ", ".join(f"{d} {v / 1e12:g} TFLOP/s" for d, v in profile.peak_flops)
        lines.append(f"device: {profile.name}: {flops}, {profile.memory_bandwidth / 1e9:g} GB/s, "
                     f"{profile.launch_s * 1e6:g} us a launch ({profile.source})")
        node = LINKS[profile.node_link]
        lines.append(f"links: {node.name} inside a node ({node.bandwidth / 1e9:g} GB/s, {node.latency_s * 1e6:g} us), "
                     f"{machine.network.name} between nodes ({machine.network.bandwidth / 1e9:g} GB/s, "
                     f"{machine.network.latency_s * 1e6:g} us): {machine.network.source}")
    lines.append("every request generates max_new_tokens (no early EOS); a batch is padded to its longest prompt")
    if not all(i.exact_prompts for i in items if i.prediction is not None):
        lines.append("prompt lengths estimated from characters (no tokenizer here)")
    if any(i.run.serving for i in items):
        lines.append("serving: the server simulated step by step on the load's seeded schedule (continuous "
                     "batching in groups, at most max_batch running), with its stock transformers kernels and its "
                     "own time a step, a streamed token and a request taken in (fitted on served runs of one rank, "
                     "else the defaults)")
    if any(i.prediction is None for i in items):
        lines.append("endpoint runs (another server) are not predicted")
    return lines


MAX_CALIBRATION_RUNS = 24  # one-rank runs an analysis fits on (evenly chosen): the fit's cost stays bounded


def profile_of_bundle(runtime: dict) -> str | None:
    """The hardware profile a bundle ran on, from run.json's runtime facts (None: not one the model knows)."""
    if runtime.get("device") == "cpu":
        return "cpu"
    name = str(runtime.get("gpu", "")).upper()
    memory = float(runtime.get("gpu_memory_bytes") or 0) / 1024**3
    for key, profile in (("T4", "t4-16gb"), ("H100", "h100-80gb"), ("A100", "a100-80gb" if memory > 50 else "a100-40gb")):
        if key in name:
            return profile
    return None


def predicted_against_measured(folder: Path, cpu_probe: CpuProbe | None = None,  # noqa: ANN201 - a DataFrame
                               others: Sequence[Path] = ()):
    """Every finished run of an experiment folder, offline and served, predicted and measured (TPOT p50, TTFT
    mean, output tokens/s), with the error of each. The model is calibrated on the folder's own one-rank offline
    runs (its references, its pp 1 runs); an engine without any there borrows the one-rank runs of that engine in
    `others` (experiments analysed together, measured on the same hardware: a serving study beside an offline
    one); without either, the folder's calibration.json, else the defaults. The `calibration` column says which,
    and `fit_warning` why a fit is not to be trusted (it ended on a bound, it misses its own runs, or the CPU
    probe it rests on was disturbed); empty where nothing was found.
    Empty where no run's hardware is known to the model."""
    import pandas as pd

    from distinfer.predict.calibrate import CALIBRATION_FILE, errors, fit_engines, fit_warnings, one_rank_served

    rows = []
    for profile, group in _by_profile(folder).items():
        machine = _bundle_machine(profile, cpu_probe)
        ones = _evenly([m for m in group if one_rank(m.run)])
        served_ones = _evenly([m for m in group if one_rank_served(m.run)])
        missing = {m.run.engine for m in group} - {m.run.engine for m in ones}
        borrowed = _evenly([m for other in others if other.resolve() != folder.resolve()
                            for m in _by_profile(other).get(profile, []) if one_rank(m.run) and m.run.engine in missing]
                           ) if missing else []  # the others' bundles are read only where an engine lacks a fit
        stored = folder / CALIBRATION_FILE
        base = load_calibration(stored) if stored.is_file() else {}
        fitted = ones + borrowed + served_ones
        fits = fit_engines(fitted, machine, base) if fitted else {}
        efficiency = {**base, **fits}
        observed = errors(group, machine, efficiency)  # every run once: the table's rows, and the fit's own errors
        calibrated_on = {m.run.run_id for m in ones + served_ones}
        own = [o for o in observed if o["run_id"] in calibrated_on] + errors(borrowed, machine, efficiency)
        warnings = {e: "fit not trusted: " + "; ".join(w)
                    for e, w in fit_warnings(fitted, machine, fits, own).items() if w}
        disturbed = (machine.probe or {}).get("disturbed")
        if disturbed:
            warnings = {e: "; ".join(filter(None, [warnings.get(e), f"CPU probe disturbed: {disturbed}"]))
                        for e in {m.run.engine for m in group} | set(efficiency)}
        sources = {**{e: str(stored) for e in base},
                   **{m.run.engine: "the one-rank runs of " + ", ".join(sorted({b.folder.parent.name for b in borrowed}))
                      for m in borrowed},
                   **{m.run.engine: "this experiment's one-rank runs" for m in ones}}
        server = {m.run.engine for m in served_ones}
        served_ids = {m.run.run_id for m in group if m.run.serving}
        for row in observed:
            used = fit_used(row["engine"], efficiency)
            source = "uncalibrated" if used is None else sources.get(used, "the defaults") + (
                "" if used == row["engine"] else f" (the {used} engine's fit)")
            if row["run_id"] in served_ids:
                source += ("; server costs: this experiment's served runs of one rank" if used in server
                           else "; server costs: the defaults")
            rows.append({**row, "profile": profile, "calibration": source,
                         "calibrated_on": row["run_id"] in calibrated_on,
                         "fit_warning": warnings.get(used or row["engine"], "")})
    return pd.DataFrame(rows)


NOT_SIMULATED = ("sessions", "trace")  # workloads the performance model does not predict


def _by_profile(folder: Path) -> dict[str, list]:
    """The folder's measured runs by the hardware profile they ran on (one machine's runs only, on CPU), those the
    model simulates: not multi-turn sessions (their prompts grow with the answers) nor replayed traces."""
    from distinfer.predict.calibrate import measured_runs

    out: dict[str, list] = {}
    for m in measured_runs(folder):
        if m.run.scenario is not None and m.run.scenario.input in NOT_SIMULATED:
            continue
        profile = profile_of_bundle(m.runtime)
        if profile and (profile != "cpu" or len(m.runtime.get("hostnames") or []) <= 1):
            out.setdefault(profile, []).append(m)
    return out


def _evenly(runs: list) -> list:
    """At most MAX_CALIBRATION_RUNS of the runs, evenly chosen."""
    if len(runs) <= MAX_CALIBRATION_RUNS:
        return runs
    return [runs[round(i * (len(runs) - 1) / (MAX_CALIBRATION_RUNS - 1))] for i in range(MAX_CALIBRATION_RUNS)]


def _bundle_machine(profile: str, cpu_probe: CpuProbe | None) -> Machine:
    probe = _probed(cpu_probe) if profile == "cpu" else None
    return Machine(HARDWARE[profile], LINKS["10gbe"], probe, local=profile == "cpu")


def predict_planned(exp: Experiment, config: Path, planned: list, calibration: Path | None, hardware: Path | None,
                    cpu_probe: CpuProbe | None) -> tuple[list[Predicted], list[str]]:
    """Each planned run's prediction (jobs.PlannedRun: the run and whether it fits) and the assumptions behind
    them; ValueError for a bad hardware or calibration file."""
    from distinfer.spec_schema import resolve_path

    runs = [item.run for item in planned]
    config_json = read_json(Path(runs[0].model_path) / "config.json") if runs and runs[0].model_path else None
    if config_json is None and exp.model.config:
        config_json = read_json(resolve_path(exp.model.config, config))
    if config_json is None:
        return [], ["no prediction: the model's config.json is not readable here (give model.config)"]
    machine = machine_for(exp, hardware, cpu_probe)
    efficiency, source = efficiency_for(calibration)
    items = predict_runs(runs, ModelFacts.from_config(config_json), machine, efficiency,
                         {i.run.run_id: i.fits for i in planned})
    return items, assumptions(machine, source, items)
