"""The command line: each command parses, calls one library function, and prints with rich."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from distinfer.spec import SpecError, load_experiment

app = typer.Typer(help="Benchmark distributed LLM inference on Slurm clusters (and locally on CPU).",
                  no_args_is_help=True, pretty_exceptions_enable=False)
models_app = typer.Typer(help="Built-in tiny models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
console = Console()
errors = Console(stderr=True)


def _load(config: Path):  # -> Experiment
    try:
        return load_experiment(config)
    except SpecError as exc:
        errors.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def results_table(title: str, results: list) -> Table:
    """One row per run: state, tokens/s, latency percentiles."""
    table = Table(title=title)
    for column in ("run", "state", "tokens", "tok/s", "TTFT p50 s", "TPOT p50 s", "E2E p90 s", "time s"):
        table.add_column(column, justify="left" if column in ("run", "state") else "right")
    for r in results:
        s = r.summary or {}
        colour = {"ok": "green", "skipped": "cyan"}.get(r.state, "red")
        table.add_row(
            r.run.run_id, f"[{colour}]{r.state}[/]", str(s.get("output_tokens", "-")),
            _fmt(s.get("output_tokens_per_s"), 1), _fmt((s.get("ttft_s") or {}).get("p50")),
            _fmt((s.get("tpot_s") or {}).get("p50"), 4), _fmt((s.get("e2e_s") or {}).get("p90")), _fmt(r.seconds, 1),
        )
    return table


@app.command()
def validate(config: Path = typer.Argument(..., help="Experiment file (YAML).")) -> None:
    """Check an experiment file and list the runs it expands to."""
    from distinfer.plan import expand

    runs = expand(_load(config), config)
    console.print(f"{config}: valid, {len(runs)} run(s): " + ", ".join(r.run_id for r in runs))


@app.command()
def run(
    config: Path = typer.Argument(..., help="Experiment file (YAML)."),
    local: bool = typer.Option(False, "--local", help="Run on this machine with torchrun on CPU (gloo)."),
    force: bool = typer.Option(False, "--force", help="Run again even where summary.json says ok."),
    outputs: Path = typer.Option(Path("outputs"), help="Folder for run bundles."),
) -> None:
    """Run every run of the experiment's matrix and print a table of the results."""
    from distinfer.plan import expand

    exp = _load(config)
    if not local:
        errors.print("error: only --local is available so far (Slurm submission: `distinfer submit`, to come)")
        raise typer.Exit(2)
    from distinfer.local import run_local

    runs = expand(exp, config)
    with console.status("starting") as status:
        def started(r) -> None:  # noqa: ANN001
            status.update(f"running {r.run_id} ({r.world_size} rank(s))")

        def done(result) -> None:  # noqa: ANN001
            note = "" if result.state != "failed" else f": {(result.summary or {}).get('error') or 'see ' + str(result.bundle.root)}"
            console.print(f"{result.state:>8}  {result.run.run_id}  ({result.seconds:.1f}s){note}", highlight=False)

        results = run_local(runs, outputs, force=force, on_start=started, on_done=done)
    console.print(results_table(f"{exp.name}: {len(results)} run(s), bundles in {outputs / exp.name}", results))
    if any(r.state == "failed" for r in results):
        raise typer.Exit(1)


@models_app.command("build-tiny")
def build_tiny(
    name: list[str] = typer.Option(["tiny-llama", "tiny-gpt2"], "--name", help="Which built-in model(s)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if cached."),
) -> None:
    """Build the built-in tiny models offline (cached in $DISTINFER_CACHE or ~/.cache/distinfer)."""
    from distinfer.models.tiny import TINY_MODELS, build_tiny_model

    for n in name:
        if n not in TINY_MODELS:
            errors.print(f"error: unknown built-in model {n!r}; allowed: {', '.join(TINY_MODELS)}")
            raise typer.Exit(2)
        console.print(f"{n}: {build_tiny_model(n, force=force)}")
