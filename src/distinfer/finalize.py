"""After a run's ranks are gone: make summary.json say what happened, naming ranks that died.

A rank that is killed outright (SIGKILL, out-of-memory killer, segfault, lost node) writes nothing,
and the ranks torchrun or Slurm then stop report `cancelled`. This step, run by the local launcher
and by the job script after `srun`, turns that into `failed` with the dead ranks named.
`python -m distinfer.finalize RUN_DIR EXIT_CODE` exits 0 when the run is ok, else non-zero: the job's
exit status. No torch import.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from distinfer.bundle import RunBundle, atomic_write_json, read_json
from distinfer.engines import program_of
from distinfer.layout import world_size


def stop_status(environ: Mapping[str, str], now: float) -> str:
    """`timeout` when a stop signal comes at or after the Slurm job's time limit (the job script exports its
    end as DISTINFER_JOB_END, from squeue), else `cancelled` (scancel, Ctrl-C)."""
    try:
        end = datetime.fromisoformat(environ.get("DISTINFER_JOB_END", "")).timestamp()
    except ValueError:  # not under Slurm, or no limit (UNLIMITED, N/A)
        return "cancelled"
    return "timeout" if now >= end - 2 else "cancelled"


def stopped(signal_name: str, environ: Mapping[str, str], now: float) -> tuple[str, str]:
    """(status, error) of a run stopped by a signal: `timeout` at the job's time limit, else `cancelled`, and
    the error saying which signal and why."""
    status = stop_status(environ, now)
    why = "the job's time limit" if status == "timeout" else "scancel, Ctrl-C or the launcher"
    return status, f"stopped by {signal_name} ({why})"


def finalize_run(run_dir: Path, exit_code: int) -> dict | None:
    """Rewrite summary.json when ranks died without a word or rank 0's summary missed another rank's failure;
    returns the final summary (None without run.json)."""
    bundle = RunBundle(run_dir)
    run_info = read_json(bundle.run_json)
    if not run_info:
        return None
    spec = run_info.get("run", {})
    world = world_size(int(spec.get("pp", 1)), int(spec.get("tp", 1) or 1), int(spec.get("ep", 1) or 1))
    summary = bundle.summary()
    # One load-generator process and no ranks of distinfer's: a serving run, and any run another program serves.
    if (spec.get("scenario") or {}).get("kind") == "serving" or program_of(spec.get("engine")) != "ranks":
        if summary is None:
            summary = {"status": "failed", "error": f"the load generator stopped without a summary (exit code "
                       f"{exit_code}); requests.jsonl keeps the requests that finished",
                       "run_id": spec.get("run_id"), "experiment": spec.get("experiment"), "engine": spec.get("engine"),
                       "world_size": 1, "ranks": [], "finalized_at": time.time()}
            atomic_write_json(bundle.summary_json, summary)
        return summary
    if summary and summary.get("status") == "ok":
        if exit_code != 0 and summary.get("launcher_exit_code") != exit_code:
            # Every rank finished ok and rank 0 wrote the summary; the launcher failed in its teardown after.
            summary["launcher_exit_code"] = exit_code
            atomic_write_json(bundle.summary_json, summary)
        return summary
    ranks = [m for m in (read_json(bundle.rank_metrics(r)) for r in range(world)) if m]
    dead = sorted(set(range(world)) - {m.get("rank") for m in ranks})
    failed = [m for m in ranks if m.get("status") == "failed"]
    if summary is not None and not dead and (summary.get("status") == "failed" or not failed):
        return summary  # every rank wrote its own state, and rank 0's summary says what happened
    if dead:
        cause = (f"rank(s) {dead} died without writing their state (killed, crashed or lost; launcher exit code "
                 f"{exit_code})")
    elif failed:  # a rank failed and the launcher then stopped the others, rank 0 among them
        cause = "; ".join(str(m.get("error")) for m in failed)
    else:
        cause = f"rank 0 wrote no summary (launcher exit code {exit_code})"
    others = "; ".join(str(m["error"]) for m in ranks if m.get("error") and m not in failed)
    summary = {
        **(summary or {}),
        "status": "failed",
        "error": cause + (f"; then: {others}" if others else ""),
        "dead_ranks": dead,
        "failed_ranks": [m.get("rank") for m in failed],
        "run_id": spec.get("run_id"),
        "experiment": spec.get("experiment"),
        "engine": spec.get("engine"),
        "world_size": world,
        "batch_size": spec.get("batch_size"),
        "ranks": sorted(ranks, key=lambda m: m.get("rank", 0)),
        "finalized_at": time.time(),
    }
    for rank in summary["ranks"]:
        rank.pop("steps", None)
    atomic_write_json(bundle.summary_json, summary)
    return summary


def main() -> None:
    if len(sys.argv) != 3:
        print("usage: python -m distinfer.finalize RUN_DIR EXIT_CODE", file=sys.stderr)
        raise SystemExit(2)
    exit_code = int(sys.argv[2])
    summary = finalize_run(Path(sys.argv[1]), exit_code)
    raise SystemExit(0 if summary and summary.get("status") == "ok" else (exit_code or 1))


if __name__ == "__main__":
    main()
