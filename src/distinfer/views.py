"""What the command line shows, as rich tables and a progress bar (built here, printed by cli.py)."""

from __future__ import annotations

import threading
from pathlib import Path

from rich.console import Console
from rich.table import Table


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def results_table(title: str, results: list) -> Table:
    """One row per run: state, tokens/s, latency percentiles."""
    table = Table(title=title)
    for column in ("run", "state", "tokens", "tok/s", "TTFT p50 s", "TPOT p50 s", "E2E p90 s", "time s"):
        table.add_column(column, justify="left" if column in ("run", "state") else "right", no_wrap=column == "run")
    for r in results:
        s = r.summary or {}
        colour = {"ok": "green", "skipped": "cyan"}.get(r.state, "red")
        table.add_row(
            r.run.run_id, f"[{colour}]{r.state}[/]", str(s.get("output_tokens", "-")),
            fmt(s.get("output_tokens_per_s"), 1), fmt((s.get("ttft_s") or {}).get("p50")),
            fmt((s.get("tpot_s") or {}).get("p50"), 4), fmt((s.get("e2e_s") or {}).get("p90")), fmt(r.seconds, 1),
        )
    return table


class RunProgress:
    """A progress bar for `run --local`: runs done of the matrix, and the current run's completions as rank 0
    writes them (read from its completions.jsonl twice a second)."""

    def __init__(self, out: Console, total: int, folder: Path) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.folder, self.current = folder, None
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[detail]}"), console=out,
                                 transient=True, refresh_per_second=2)
        self.task = self.progress.add_task("runs", total=total, detail="")
        self.console = self.progress.console
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> RunProgress:
        self.progress.__enter__()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.progress.__exit__(None, None, None)

    def started(self, run) -> None:  # noqa: ANN001
        self.current = run
        self.progress.update(self.task, detail=f"{run.run_id} ({run.world_size} rank(s)): starting")

    def finished(self) -> None:
        self.current = None
        self.progress.update(self.task, advance=1, detail="")

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            run = self.current
            if run is None:
                continue
            try:
                with (self.folder / run.run_id / "completions.jsonl").open("rb") as f:
                    lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 16), b""))
            except OSError:
                continue
            self.progress.update(self.task, detail=f"{run.run_id} ({run.world_size} rank(s)): {lines} completion(s)")


def rank_table(item) -> Table:  # noqa: ANN001 - a jobs.PlannedRun with its memory per rank
    """Each rank's memory of a tensor-parallel run: its stage, its place in the stage's tp group, its share."""
    run = item.run
    table = Table(title=f"{run.run_id}: memory per rank (GiB)")
    for column in ("rank", "stage", "tp rank", "layers", "weights", "KV", "act", "total", "fits"):
        table.add_column(column, justify="right")
    for rank, memory in enumerate(item.memory):
        stage, tp_rank = divmod(rank, run.tp)
        table.add_row(str(rank), str(stage), str(tp_rank), f"{memory.layers[0]}-{memory.layers[1] - 1}",
                      gib(memory.weights), gib(memory.kv_cache), gib(memory.activations), gib(memory.total),
                      "yes" if memory.fits else "[red]no[/]")
    return table


def gib(n: int) -> str:
    return f"{n / 1024**3:.2f}"


def busy(p) -> str:  # noqa: ANN001 - a Prediction or None
    """The ranks' predicted share of the wall time spent computing: '97' for one rank, '48-52' for several."""
    if p is None or not p.rank_busy_s or not p.wall_s:
        return "-"
    low, high = (100 * f(p.rank_busy_s) / p.wall_s for f in (min, max))
    return f"{low:.0f}" if round(low) == round(high) else f"{low:.0f}-{high:.0f}"


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def plan_table(name: str, profile, planned: list, items: list) -> Table:  # noqa: ANN001 - a HardwareProfile
    """`plan`'s table: each run's memory on its fullest rank, whether it fits, and its predicted TPOT and tokens/s."""
    predicted = {i.run.run_id: i.prediction for i in items}
    table = Table(title=f"{name} on {profile.name} ({gib(profile.memory_bytes)} GiB usable per rank)")
    for column in ("run", "ranks", "weights GiB", "KV GiB", "act GiB", "overhead GiB", "total GiB", "fits",
                   "TPOT ms", "tokens/s"):
        table.add_column(column, justify="left" if column == "run" else "right", no_wrap=column == "run")
    for item in planned:
        worst = max(item.memory, key=lambda m: m.total, default=None)
        p = predicted.get(item.run.run_id)
        guess = (ms(p.tpot_s), f"{p.output_tokens_per_s:.1f}") if p else ("-", "-")
        if worst is None:
            table.add_row(item.run.run_id, str(item.run.world_size), "?", "?", "?", "?", "?", "[yellow]unknown[/]",
                          *guess)
            continue
        table.add_row(item.run.run_id, str(item.run.world_size), gib(worst.weights), gib(worst.kv_cache),
                      gib(worst.activations), gib(worst.overhead), gib(worst.total),
                      "[green]yes[/]" if item.fits else "[red]no[/]", *guess)
    return table


def prediction_table(title: str, planned: list, items: list, show_cost: bool) -> Table:
    """`predict`'s table: memory, fit, predicted TTFT, TPOT, tokens/s, busy share and GPU-hours per 1M tokens."""
    table = Table(title=title)
    for column in ("run", "ranks", "GiB/rank", "fits", "TTFT ms", "TPOT ms", "tokens/s", "busy %", "GPU-h/1M tok"):
        table.add_column(column, justify="left" if column == "run" else "right", no_wrap=column == "run")
    memory = {i.run.run_id: max((m.total for m in i.memory), default=None) for i in planned}
    for item in items:
        p = item.prediction
        total = memory.get(item.run.run_id)
        table.add_row(item.run.run_id, str(item.run.world_size), "?" if total is None else gib(total),
                      "yes" if item.fits else "[red]no[/]", ms(p and p.ttft_s), ms(p and p.tpot_s),
                      "-" if p is None else f"{p.output_tokens_per_s:.1f}", busy(p),
                      "-" if item.gpu_hours_per_million_tokens is None or not show_cost
                      else f"{item.gpu_hours_per_million_tokens:.2f}")
    return table
