"""Calibration: the efficiencies and fixed costs of each engine, fitted to measured one-stage runs.

Only runs of one rank are used (the pipeline engine with pp 1, tp 1, ep 1, any micro-batches; the reference):
they hold no messages between stages and no collectives, so what the model predicts for a split layout rests on
what it learnt from one device and on the link profiles. Each finished offline run gives three observations (TPOT
p50, TTFT mean, output tokens/s); the parameters minimise the squared log ratio of predicted to measured over all
of them; a run measured in several folders counts once, at the median of its measurements. The result is stored
with the observations it came from and how well it fits them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from distinfer.bundle import BUNDLE_SCHEMA, atomic_write_json, read_json
from distinfer.engines import capabilities
from distinfer.memory import ModelFacts
from distinfer.predict.fit import nelder_mead
from distinfer.predict.model import Efficiency, Machine, Prediction
from distinfer.predict.workload import prompt_lengths

CALIBRATION_FILE = "calibration.json"
CALIBRATION_VERSION = 1
METRICS = ("tpot", "ttft", "tokens_per_s")


class CalibrationError(ValueError):
    """No usable runs, or an unreadable calibration file; the message says what was looked for."""


@dataclass(frozen=True)
class MeasuredRun:
    folder: Path
    run: object  # plan.RunSpec
    summary: dict
    runtime: dict  # run.json's runtime facts (hosts, device)

    def measured(self, metric: str) -> float | None:
        s = self.summary
        value = {"tpot": (s.get("tpot_s") or {}).get("p50"), "ttft": (s.get("ttft_s") or {}).get("mean"),
                 "tokens_per_s": s.get("output_tokens_per_s")}[metric]
        return float(value) if value else None


def predicted(p: Prediction, metric: str) -> float:
    return {"tpot": p.tpot_s, "ttft": p.ttft_s, "tokens_per_s": p.output_tokens_per_s}[metric]


def measured_runs(folder: Path) -> list[MeasuredRun]:
    """The finished runs of an experiment folder (outputs/EXP), offline and served by a server of the run's own
    (not an endpoint's), skipping anything unreadable."""
    from distinfer.plan import RunSpec

    runs = []
    for run_dir in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        run_json, summary = read_json(run_dir / "run.json"), read_json(run_dir / "summary.json")
        if (not isinstance(run_json, dict) or run_json.get("schema") != BUNDLE_SCHEMA or not isinstance(summary, dict)
                or summary.get("status") != "ok"):
            continue
        try:
            run = RunSpec.from_dict(run_json["run"])
        except (KeyError, TypeError):
            continue
        if (capabilities(run.engine).program == "endpoint"
                or not Path(run.model_path or "").joinpath("config.json").is_file()):
            continue
        runs.append(MeasuredRun(run_dir, run, summary, run_json.get("runtime") or {}))
    return runs


def median_of_repeats(runs: list[MeasuredRun]) -> list[MeasuredRun]:
    """One MeasuredRun per distinct run (the same spec measured in several folders, as a study repeated to even out
    a shared machine's drift), at the median of its measurements of each metric; runs measured once unchanged."""
    groups: dict[str, list[MeasuredRun]] = {}
    for m in runs:
        spec = {k: v for k, v in m.run.to_dict().items() if k != "experiment"}
        groups.setdefault(json.dumps(spec, sort_keys=True, default=str), []).append(m)
    out = []
    for group in groups.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        values = {k: [v for v in (m.measured(k) for m in group) if v] for k in METRICS}
        middle = {k: statistics.median(v) if v else None for k, v in values.items()}
        summary = {**group[0].summary, "tpot_s": {"p50": middle["tpot"]}, "ttft_s": {"mean": middle["ttft"]},
                   "output_tokens_per_s": middle["tokens_per_s"], "measurements": len(group)}
        out.append(MeasuredRun(group[0].folder, group[0].run, summary, group[0].runtime))
    return out


def one_rank(run) -> bool:  # noqa: ANN001
    """An offline run of one rank: what calibration fits on."""
    return not run.serving and capabilities(run.engine).one_rank(run.pp, run.tp, run.ep)


def one_rank_served(run) -> bool:  # noqa: ANN001
    """A run served by a server of one rank and one group of requests: what the server's own costs are fitted on."""
    caps = capabilities(run.engine)
    return (run.serving and caps.pp and caps.one_rank(run.pp, run.tp, run.ep)
            and caps.groups(run.pp, run.microbatches) == 1)


def facts_of(run) -> ModelFacts:  # noqa: ANN001
    return _facts(run.model_path)


@functools.lru_cache(maxsize=64)
def _facts(model_path: str) -> ModelFacts:
    return ModelFacts.from_config(json.loads((Path(model_path) / "config.json").read_text()))


def errors(runs: list[MeasuredRun], machine: Machine, efficiency: dict[str, Efficiency]) -> list[dict]:
    """Predicted against measured for each run and metric: {run_id, metric, measured, predicted, error}."""
    from distinfer.predict.serving import predict_any

    out = []
    for m in runs:
        p = predict_any(m.run, facts_of(m.run), machine, efficiency, prompt_lengths(m.run)[0])
        for metric in METRICS:
            value = m.measured(metric)
            if value:
                guess = predicted(p, metric)
                out.append({"experiment": m.folder.parent.name, "run_id": m.run.run_id, "engine": m.run.engine,
                            "metric": metric, "measured": value, "predicted": guess, "error": guess / value - 1})
    return out


OFFLINE = ("compute", "memory", "step_s", "batch_s", "cycle_s", "prefill")  # what offline runs of one rank fit
SERVER = ("serve_step_s", "serve_token_s", "serve_request_s")  # what served runs of one rank fit, the offline ones held


def fit_engine(runs: list[MeasuredRun], machine: Machine, engine: str, base: Efficiency | None = None,
               names: tuple[str, ...] = OFFLINE) -> Efficiency:
    """The Efficiency that brings predictions of these runs closest to their measurements, fitting the parameters
    `names` (the others held at `base`'s): Nelder-Mead from a few starting points over the free parameters (fixed
    times in log space, fractions of peak through a logistic map into their bounds)."""
    from distinfer.predict.serving import predict_any

    base = base or Efficiency()
    prepared = [(m.run, facts_of(m.run), prompt_lengths(m.run)[0], {k: m.measured(k) for k in METRICS})
                for m in runs]
    space = ParameterSpace(BOUNDS_GPU if machine.profile.gpu else BOUNDS_CPU, names, base)

    def loss(x: list[float]) -> float:
        eff = space.efficiency(x)
        total = 0.0
        for run, facts, lengths, measured in prepared:
            p = predict_any(run, facts, machine, {engine: eff}, lengths)
            for metric, value in measured.items():
                guess = predicted(p, metric)
                if value and guess > 0:
                    total += math.log(guess / value) ** 2
        return total

    best: tuple[list[float], float] | None = None
    for start in STARTS if names == OFFLINE else (base,):
        found = nelder_mead(loss, space.point(start), step=1.0, iterations=300)
        if best is None or found[1] < best[1]:
            best = found
    assert best is not None
    return space.efficiency(best[0])


STARTS = (Efficiency(), Efficiency(0.1, 1.0, 1e-4, 1e-2, 1e-3, 0.3), Efficiency(0.9, 1.0, 2e-3, 1e-4, 1e-5, 0.9),
          Efficiency(0.3, 1.0, 1e-5, 3e-2, 1e-2, 0.6))
# The fractions of the device's figures a fit may reach. One-rank runs alone cannot tell a forward's fixed host time
# from its reads (both are paid once a forward, whatever the batch), and a split layout depends on which is which
# (the fixed time is paid by every stage, the reads are split among them). So the reads are held at what the device
# is known to do: on a CPU, the probe's read bandwidth (measured with the same library and threads), on a GPU,
# a range around the usual 70-90 % of the datasheet's.
BOUNDS_CPU = {"compute": (0.01, 1.5), "prefill": (0.01, 1.5), "memory": (1.0, 1.0)}
BOUNDS_GPU = {"compute": (0.01, 1.0), "prefill": (0.01, 1.0), "memory": (0.5, 1.0)}


TIME_FLOOR_S = 1e-12  # a fitted fixed time below this sits at the floor of its log coordinate (e^-50)
FIT_ERROR_LIMIT = 0.15  # a fit whose median error on its own runs is above this does not describe them


class ParameterSpace:
    """The minimiser's coordinates: one per free parameter among `names` (a fixed bound like the CPU's memory is
    no coordinate; parameters not named keep `base`'s values)."""

    def __init__(self, bounds: dict[str, tuple[float, float]], names: tuple[str, ...] = OFFLINE,
                 base: Efficiency | None = None) -> None:
        self.bounds, self.base = bounds, base or Efficiency()
        self.free = [n for n in names if n not in bounds or bounds[n][0] < bounds[n][1]]
        self.fixed = {n: low for n, (low, high) in bounds.items() if n in names and low == high}

    def efficiency(self, x: list[float]) -> Efficiency:
        values = dict(self.fixed)
        for name, v in zip(self.free, x):
            if name in self.bounds:
                low, high = self.bounds[name]
                values[name] = low * (high / low) ** (1 / (1 + math.exp(-v)))
            else:
                values[name] = math.exp(max(-50.0, min(5.0, v)))
        return dataclasses.replace(self.base, **values)

    def at_bounds(self, eff: Efficiency) -> list[str]:
        """The free parameters that ended on a bound of the fit: a fraction of peak within 1 % (in log space) of
        its range's end, a fixed time at the floor of its log coordinate (zero in effect) or its ceiling."""
        found = []
        for name in self.free:
            value = getattr(eff, name)
            if name in self.bounds:
                low, high = self.bounds[name]
                share = math.log(value / low) / math.log(high / low)
                if share < 0.01 or share > 0.99:
                    found.append(f"{name} at its {'lower' if share < 0.5 else 'upper'} bound ({value:.3g})")
            elif value < TIME_FLOOR_S:
                found.append(f"{name} at its floor ({value:.1e} s, nothing left for it to explain)")
            elif value > 0.99 * math.exp(5.0):
                found.append(f"{name} at its ceiling ({value:.3g} s)")
        return found

    def point(self, eff: Efficiency) -> list[float]:
        out = []
        for name in self.free:
            value = getattr(eff, name)
            if name in self.bounds:
                low, high = self.bounds[name]
                share = min(0.999, max(0.001, math.log(value / low) / math.log(high / low)))
                out.append(math.log(share / (1 - share)))
            else:
                out.append(math.log(max(value, 1e-12)))
        return out


def fit_engines(runs: list[MeasuredRun], machine: Machine, base: dict[str, Efficiency] | None = None
                ) -> dict[str, Efficiency]:
    """One Efficiency per engine among the runs: the forward's parameters fitted on its offline runs of one rank
    (else `base`'s, else the defaults), then the server's on its served runs of one rank, if any."""
    out = {}
    for engine in sorted({m.run.engine for m in runs}):
        offline = [m for m in runs if m.run.engine == engine and one_rank(m.run)]
        served = [m for m in runs if m.run.engine == engine and one_rank_served(m.run)]
        eff = (base or {}).get(engine, Efficiency())
        if offline:
            eff = fit_engine(offline, machine, engine, eff)
        if served:
            eff = fit_engine(served, machine, engine, eff, SERVER)
        if offline or served:
            out[engine] = eff
    return out


def fit_warnings(runs: list[MeasuredRun], machine: Machine, efficiency: dict[str, Efficiency],
                 observations: list[dict] | None = None) -> dict[str, list[str]]:
    """Per fitted engine, why its fit is not to be trusted (empty: nothing found): parameters that ended on a
    bound, or a median error above FIT_ERROR_LIMIT on the very runs it was fitted on (`runs`, those of one rank)."""
    observations = errors(runs, machine, efficiency) if observations is None else observations
    bounds = BOUNDS_GPU if machine.profile.gpu else BOUNDS_CPU
    out = {}
    for engine, eff in efficiency.items():
        found = []
        if any(m.run.engine == engine and one_rank(m.run) for m in runs):
            found += ParameterSpace(bounds, OFFLINE).at_bounds(eff)
        if any(m.run.engine == engine and one_rank_served(m.run) for m in runs):
            found += ParameterSpace(bounds, SERVER).at_bounds(eff)
        errs = [abs(o["error"]) for o in observations if o["engine"] == engine]
        if errs and statistics.median(errs) > FIT_ERROR_LIMIT:
            found.append(f"median error {statistics.median(errs):.0%} on its own calibration runs "
                         f"(above {FIT_ERROR_LIMIT:.0%})")
        out[engine] = found
    return out


def calibrate(folders: list[Path], machine: Machine) -> dict:
    """Fit each engine's Efficiency on the one-rank runs under `folders` (offline: the forwards; served: the
    server's own costs); CalibrationError where there are none."""
    runs = median_of_repeats([m for folder in folders for m in measured_runs(folder)])
    usable = [m for m in runs if one_rank(m.run) or one_rank_served(m.run)]
    if not usable:
        names = ", ".join(str(f) for f in folders)
        raise CalibrationError(
            f"{names}: no usable runs to calibrate on: it needs finished offline runs of one rank (engine pipeline "
            f"with pp 1, tp 1, ep 1, or reference runs), or runs served by one rank, whose model folder is here; "
            f"found {len(runs)} finished run(s) with a model folder, none of one rank")
    efficiency = fit_engines(usable, machine)
    engines = sorted(efficiency)
    observations = errors(usable, machine, efficiency)
    warnings = fit_warnings(usable, machine, efficiency, observations)
    fit = {}
    for engine in engines:
        errs = [abs(o["error"]) for o in observations if o["engine"] == engine]
        fit[engine] = {"runs": sorted({o["run_id"] for o in observations if o["engine"] == engine}),
                       "median_abs_error": statistics.median(errs), "max_abs_error": max(errs),
                       "trusted": not warnings[engine], "warnings": warnings[engine]}
    return {"version": CALIBRATION_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "device": machine.profile.name, "probe": machine.probe, "local": machine.local,
            "folders": [str(f) for f in folders], "efficiency": {e: v.to_dict() for e, v in efficiency.items()},
            "fit": fit, "observations": observations}


def save_calibration(data: dict, path: Path) -> None:
    atomic_write_json(path, data)


def load_calibration(path: Path) -> dict[str, Efficiency]:
    """The per-engine efficiencies of a calibration file; CalibrationError naming the file otherwise."""
    data = read_json(path) if path.is_file() else None
    if not isinstance(data, dict) or not isinstance(data.get("efficiency"), dict):
        raise CalibrationError(f"{path}: not a calibration file (expected JSON with an 'efficiency' mapping, as "
                               "`distinfer predict CONFIG --calibrate outputs/EXP` writes)")
    try:
        return {engine: Efficiency(**values) for engine, values in data["efficiency"].items()}
    except TypeError as exc:
        raise CalibrationError(f"{path}: field 'efficiency': {exc}") from None
