"""Load every run bundle of an experiment folder into one table, listing what could not be used."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from distinfer.bundle import BUNDLE_SCHEMA
from distinfer.engines import ENGINES, program_of

LATENCIES = ("ttft_s", "tpot_s", "itl_s", "e2e_s", "ttft_intended_s", "e2e_intended_s", "send_lag_s")
SERVING_FIELDS = ("load", "load_value", "served_model", "offered_rate", "achieved_rate", "request_throughput",
                  "goodput", "slo_attained", "completed", "errors", "peak_concurrency", "duration_s",
                  "prefix_cache_hit_rate", "scheduled_rate", "client_cpu_share", "valid")


@dataclass
class LoadedExperiment:
    name: str
    runs: pd.DataFrame  # one row per run whose summary.json is readable and of this experiment
    ranks: pd.DataFrame  # one row per (run, rank)
    problems: list[dict] = field(default_factory=list)  # {run_id, problem}
    completions: dict[str, list[list[int]]] = field(default_factory=dict)
    provenance: dict[str, dict] = field(default_factory=dict)
    model: str = "?"
    hardware: str = "?"
    study: str = "matrix"
    warnings: list[str] = field(default_factory=list)  # what the figures rest on that is not to be trusted


def _read(path: Path) -> tuple[dict | None, str | None]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None, f"{path.name} missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{path.name} unreadable ({type(exc).__name__})"
    if not isinstance(data, dict):
        return None, f"{path.name} is not a JSON object"
    return data, None


def _completions(path: Path) -> list[list[int]]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    try:  # one parse for the whole file (a killed run's torn last line makes it fail: then line by line)
        return [record["output_token_ids"] for record in json.loads("[" + ",".join(lines) + "]")]
    except (json.JSONDecodeError, KeyError, TypeError):
        pass
    out = []
    for line in lines:
        try:
            out.append(json.loads(line)["output_token_ids"])
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a torn last line of a killed run
    return out


def load_experiment_outputs(folder: Path) -> LoadedExperiment:
    """Rows for usable runs; failed, unfinished, unreadable and foreign runs go to `problems`."""
    name = folder.name
    rows, rank_rows, problems = [], [], []
    completions, provenance = {}, {}
    model, hardware = "?", "?"
    for run_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        run_json, error = _read(run_dir / "run.json")
        if run_json is None:
            problems.append({"run_id": run_dir.name, "problem": error or "no run.json"})
            continue
        if run_json.get("schema") != BUNDLE_SCHEMA:
            problems.append({"run_id": run_dir.name, "problem": f"bundle schema {run_json.get('schema', 1)} from another "
                             f"distinfer version (this one reads {BUNDLE_SCHEMA}); run it again to include it"})
            continue
        spec = run_json.get("run", {})
        if spec.get("experiment") != name:
            problems.append({"run_id": run_dir.name,
                             "problem": f"belongs to experiment {spec.get('experiment')!r}, not {name!r}"})
            continue
        summary, error = _read(run_dir / "summary.json")
        if summary is None:
            problems.append({"run_id": run_dir.name, "problem": "unfinished (no summary.json)"
                             if error == "summary.json missing" else error})
            continue
        if summary.get("status") != "ok":
            problems.append({"run_id": run_dir.name, "problem": f"{summary.get('status')}: {summary.get('error')}"})
            continue
        # A server's ranks and vLLM's write no per-step metrics files.
        own_ranks = summary.get("scenario") != "serving" and program_of(spec.get("engine")) == "ranks"
        ranks_writing = int(summary.get("world_size", 1)) if own_ranks else 0
        missing = [r for r in range(ranks_writing)
                   if not (run_dir / f"metrics_rank_{r}.json").is_file()]
        if missing:
            problems.append({"run_id": run_dir.name, "problem": f"metrics of rank(s) {missing} missing; "
                             "per-rank breakdown left out"})
        row = {k: spec.get(k) for k in ("run_id", "engine", "pp", "tp", "microbatches", "batch_size", "dtype",
                                         "quantization", "num_prompts", "study", "repeats")}
        row["tp"] = row["tp"] or 1
        row["ep"] = spec.get("ep") or 1
        row["layout"] = layout_name(row)
        row["sampling"] = (spec.get("generation") or {}).get("sampling", "greedy")
        row["precision"] = summary.get("precision")  # RunSpec.precision / .context_tokens, as the run recorded them
        row["context_tokens"] = summary.get("context_tokens")
        row["perplexity"] = summary.get("perplexity")
        row["world_size"] = summary.get("world_size")
        row["output_tokens"] = summary.get("output_tokens")
        row["output_tokens_per_s"] = summary.get("output_tokens_per_s")
        row["prompts_per_s"] = summary.get("prompts_per_s")
        row["wall_s"] = summary.get("wall_s")
        for metric in LATENCIES:
            for stat, value in (summary.get(metric) or {}).items():
                row[f"{metric.removesuffix('_s')}_{stat}_s"] = value
        ranks = summary.get("ranks") or []
        row["peak_memory_bytes"] = max((r.get("peak_memory_bytes") or 0 for r in ranks), default=None)
        row["load_s"] = summary.get("load_s")
        row["scenario"] = summary.get("scenario") or "offline"
        if row["scenario"] == "serving":
            row.update({k: summary.get(k) for k in SERVING_FIELDS})
            row["offered_rate"] = float("inf") if row["offered_rate"] == "inf" else row["offered_rate"]
            value = row["load_value"]  # one type for the column: "4", "0.5", "inf", or a user count
            row["load_value"] = value if isinstance(value, str) else f"{value:g}"
            row.update({f"slo_{k}_s": v for k, v in (summary.get("slo") or {}).items()})
            row["invalid_reasons"] = "; ".join(summary.get("invalid_reasons") or [])
            if row["valid"] is None:  # a bundle from before validity was judged: taken as measured
                row["valid"] = True
        rows.append(row)
        if not missing:
            for r in ranks:
                rank_rows.append({"run_id": row["run_id"], "rank": r.get("rank"), "compute_s": r.get("compute_s"),
                                  "comm_s": r.get("comm_s"), "wait_s": r.get("wait_s"),
                                  "peak_memory_bytes": r.get("peak_memory_bytes"), "layers": len(r.get("layers") or []),
                                  "stage": r.get("stage"), "all_to_all_s": r.get("all_to_all_s"),
                                  "expert_tokens": r.get("expert_tokens")})
        completions[row["run_id"]] = _completions(run_dir / "completions.jsonl")
        if program_of(spec.get("engine")) == "endpoint":
            model, hardware = str(summary.get("served_model")), f"the endpoint {summary.get('endpoint')}"
        else:
            model = spec.get("builtin") or Path(spec.get("model_path") or "?").name
            device = (run_json.get("runtime") or {}).get("device", "?")
            hardware = "CPU (gloo)" if device == "cpu" else f"GPU {device} (NCCL)"
        provenance[row["run_id"]] = {**run_json.get("provenance", {}), "runtime": run_json.get("runtime", {}),
                                     "slurm": _read(run_dir / "slurm.json")[0]}
    studies = {r.get("study") or "matrix" for r in rows}
    return LoadedExperiment(name, pd.DataFrame(rows), pd.DataFrame(rank_rows), problems, completions, provenance,
                            model, hardware, studies.pop() if len(studies) == 1 else "matrix")


def layout_name(row: dict) -> str:
    """How a run splits the model: 'pp2', 'pp2 x tp2', 'pp1 x ep2' (pipeline, vLLM), 'tp2' (DeepSpeed), '1' (one
    rank)."""
    caps = ENGINES.get(str(row.get("engine")))
    if caps is not None and caps.pp:
        return " x ".join([f"pp{row.get('pp') or 1}"] + [f"{axis}{row[axis]}" for axis in ("tp", "ep")
                                                           if (row.get(axis) or 1) > 1])
    if caps is not None and caps.tp:
        return f"tp{row.get('tp') or 1}"
    return "1"
