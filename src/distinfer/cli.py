"""The command line: each command parses, calls one library function, and prints with rich."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from distinfer.quiet import route_third_party_logs
from distinfer.spec import SpecError, load_experiment
from distinfer.views import RunProgress, gib, plan_table, prediction_table, rank_table, results_table

app = typer.Typer(help="Benchmark distributed LLM inference on Slurm clusters (and locally on CPU).",
                  no_args_is_help=True, pretty_exceptions_enable=False)
models_app = typer.Typer(help="Built-in tiny models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
route_third_party_logs()  # a built-in model's build imports transformers, which imports DeepSpeed and torchao
# Tables need about 120 columns; a pipe or a CI log is not a terminal and would get 80.
console = Console(width=None if sys.stdout.isatty() else 120)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


@contextmanager
def _exit_on(error: type[Exception], code: int) -> Iterator[None]:
    """Turn an expected library error into one clear message and an exit code, never a traceback."""
    try:
        yield
    except error as exc:
        errors.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(code) from None


def _need_runtime(command: str) -> None:
    """The commands that run models need the `runtime` extra; a base install (a login node) says so."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        errors.print(f"[bold red]error:[/] `distinfer {command}` runs models and needs PyTorch and transformers "
                     f"({exc.name or exc}): pip install 'distinfer\\[runtime]' (the cluster's compute nodes have them; "
                     "plan, submit, status and analyze do not need them)", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _load(config: Path, require_model: bool = True):  # -> Experiment
    with _exit_on(SpecError, 2):
        return load_experiment(config, require_model=require_model)


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
        errors.print("error: `run` needs --local; on a Slurm cluster use `distinfer submit CONFIG`")
        raise typer.Exit(2)
    if exp.endpoint is None:
        _need_runtime("run --local")
    from distinfer.launchers.local import run_local

    runs = expand(exp, config)
    with RunProgress(console, len(runs), outputs / exp.name) as progress:
        def done(result) -> None:  # noqa: ANN001
            note = "" if result.succeeded else f": {(result.summary or {}).get('error') or 'see ' + str(result.bundle.root)}"
            progress.console.print(f"{result.state:>8}  {result.run.run_id}  ({result.seconds:.1f}s){note}",
                                   highlight=False)
            progress.finished()

        try:
            results = run_local(runs, outputs, force=force, on_start=progress.started, on_done=done)
        except KeyboardInterrupt:  # the ranks got the same Ctrl-C and wrote their state
            errors.print("interrupted: finished runs are kept; run the same command again to continue")
            raise typer.Exit(130) from None
    console.print(results_table(f"{exp.name}: {len(results)} run(s), bundles in {outputs / exp.name}", results))
    if not all(r.succeeded for r in results):
        raise typer.Exit(1)


PLAN_ROWS = 60  # runs `plan` lists one per row; the rejected ones are named below the table in any case
PER_RANK_RUNS = 4  # tensor-parallel runs whose memory `plan` also shows rank by rank


def _plan(config: Path, outputs: Path, write: bool = True):  # -> (Experiment, list[PlannedRun])
    from distinfer.jobs import plan_experiment
    from distinfer.slurm import RenderError

    exp = _load(config, require_model=False)
    with _exit_on(RenderError, 2):
        return exp, plan_experiment(exp, config, outputs, write)


@app.command()
def plan(
    config: Path = typer.Argument(..., help="Experiment file (YAML)."),
    outputs: Path = typer.Option(Path("outputs"), help="Folder for run bundles."),
) -> None:
    """Expand the matrix, check each run's memory per GPU, and write run.json + job.sbatch per run."""
    from distinfer.models.tiny import cache_dir
    from distinfer.predict.calibrate import CALIBRATION_FILE
    from distinfer.predict.study import predict_planned
    from distinfer.probes.cpu import cpu_probe
    from distinfer.profiles import HARDWARE

    exp, planned = _plan(config, outputs)
    profile = HARDWARE[exp.cluster.profile]
    calibration = outputs / exp.name / CALIBRATION_FILE
    try:  # the prediction of the runs shown, beside their memory; `predict` tells its assumptions
        items, notes = predict_planned(exp, config, planned[:PLAN_ROWS],
                                       calibration if calibration.is_file() else None, None, cpu_probe(cache_dir()))
    except ValueError as exc:
        items, notes = [], [f"no prediction: {exc}"]
    console.print(plan_table(exp.name, profile, planned[:PLAN_ROWS], items))
    console.print(f"TPOT and tokens/s are predicted ({notes[0].removeprefix('efficiencies: ')}); "
                  "`distinfer predict CONFIG` lists the assumptions", highlight=False)
    if len(planned) > PLAN_ROWS:
        console.print(f"... and {len(planned) - PLAN_ROWS} more run(s); each run's plan is in its run.json")
    pp_runs = [i for i in planned if i.run.pp > 1 and i.memory]
    if pp_runs:
        console.print("Pipeline runs split the weights: each stage holds only its layers "
                      f"(e.g. {pp_runs[0].run.run_id}: {', '.join(gib(m.weights) for m in pp_runs[0].memory)} GiB "
                      "of weights per rank).")
    for item in [i for i in planned if i.run.tp > 1 and i.memory][:PER_RANK_RUNS]:
        console.print(rank_table(item))
    rejected = [i for i in planned if not i.fits and i.memory]
    for item in rejected:
        worst = max(item.memory, key=lambda m: m.total)
        console.print(f"[red]does not fit:[/] {item.run.run_id} needs {gib(worst.total)} GiB on one rank "
                      f"> {gib(worst.capacity)} GiB; use fewer tokens, a smaller batch, float16 or more stages")
    console.print(f"wrote run.json and job.sbatch for {len(planned) - len(rejected)} run(s) under {outputs / exp.name}")


def _calibrate(exp, folders: list[Path], hardware: Path | None) -> Path:  # noqa: ANN001 - an Experiment
    """Fit the model on the folders' one-rank runs, write calibration.json into each, say how well it fits."""
    from distinfer.models.tiny import cache_dir
    from distinfer.predict.calibrate import CALIBRATION_FILE, calibrate, save_calibration
    from distinfer.predict.study import machine_for
    from distinfer.probes.cpu import cpu_probe

    data = calibrate(folders, machine_for(exp, hardware, cpu_probe(cache_dir())))
    for folder in folders:
        save_calibration(data, folder / CALIBRATION_FILE)
    for engine, fit in data["fit"].items():
        console.print(f"{'calibrated' if fit['trusted'] else '[yellow]not calibrated (fit not trusted)[/]:'} "
                      f"{engine} on {len(fit['runs'])} run(s): median error "
                      f"{fit['median_abs_error']:.1%}, worst {fit['max_abs_error']:.1%} "
                      f"({', '.join(f'{k} {v:.3g}' for k, v in data['efficiency'][engine].items())})", highlight=False)
        for warning in fit["warnings"]:
            console.print(f"  [yellow]warning:[/] {warning}", highlight=False)
    return folders[0] / CALIBRATION_FILE


@app.command()
def predict(
    config: Path = typer.Argument(..., help="Experiment file (YAML)."),
    calibration: Path = typer.Option(None, help="A calibration file to predict with (calibration.json)."),
    calibrate_on: list[Path] = typer.Option([], "--calibrate", help="Experiment folders (outputs/EXP) whose "
                                            "one-rank runs to fit the model on; writes calibration.json there."),
    hardware: Path = typer.Option(None, help="A hardware file (YAML) with the device's peak figures."),
    goal: str = typer.Option("all", help="Best layouts for: tokens_per_s | tpot | cost | all."),
    probe: bool = typer.Option(False, "--probe", help="Measure this machine's CPU again (the cpu profile; cached "
                               "otherwise): do it while the machine is quiet."),
    outputs: Path = typer.Option(Path("outputs"), help="Folder for run bundles."),
) -> None:
    """Predict every run's memory, TTFT, TPOT and tokens/s, and name the best layouts for a goal."""
    from distinfer.models.tiny import cache_dir
    from distinfer.predict.study import GOALS, best, predict_planned
    from distinfer.probes.cpu import cpu_probe, probe_in_child

    if goal not in (*GOALS, "all"):
        errors.print(f"error: --goal {goal!r}: allowed: {', '.join(GOALS)}, all")
        raise typer.Exit(2)
    exp, planned = _plan(config, outputs, write=False)
    with _exit_on(ValueError, 2):  # a bad hardware file, calibration file or folder: one message, exit 2
        if probe and exp.cluster.profile == "cpu" and hardware is None:
            probe_in_child(cache_dir(), fresh=True)
        if calibrate_on:
            calibration = _calibrate(exp, calibrate_on, hardware)
        items, notes = predict_planned(exp, config, planned, calibration, hardware, cpu_probe(cache_dir()))
    console.print(prediction_table(f"{exp.name}: predicted on {exp.cluster.profile}", planned, items[:PLAN_ROWS],
                                   show_cost=exp.cluster.profile != "cpu"))
    if len(items) > PLAN_ROWS:
        console.print(f"... and {len(items) - PLAN_ROWS} more run(s)")
    labels = {"tokens_per_s": "most tokens/s", "tpot": "lowest TPOT", "cost": "fewest GPU-hours per 1M tokens"}
    for g in GOALS if goal == "all" else (goal,):
        if g == "cost" and exp.cluster.profile == "cpu":
            continue
        top = best(items, g)
        if top is not None:
            console.print(f"best for {labels[g]}: {top.run.run_id}", highlight=False)
    console.print("assumptions:\n" + "\n".join(f"  - {line}" for line in notes), highlight=False)


@app.command()
def submit(
    config: Path = typer.Argument(..., help="Experiment file (YAML)."),
    outputs: Path = typer.Option(Path("outputs"), help="Folder for run bundles."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan and say what would be submitted."),
    force: bool = typer.Option(False, "--force", help="Submit runs that already finished ok, too."),
) -> None:
    """Submit every planned run that has no ok summary.json (and no job still queued or running)."""
    from distinfer.jobs import submit as submit_runs
    from distinfer.launchers.slurm import SlurmLauncher
    from distinfer.slurm import SlurmError

    exp, planned = _plan(config, outputs)
    with _exit_on(SlurmError, 1):
        actions = submit_runs(planned, SlurmLauncher(outputs, exp.cluster, exp.container), exp.name, force=force,
                              dry_run=dry_run)
    for run_id, action, job_id in actions:
        console.print(f"{action:>18}  {run_id}" + (f"  job {job_id}" if job_id else ""), highlight=False)


def _experiment_dir(experiment: Path, outputs: Path) -> tuple[Path, str]:
    """EXPERIMENT may be the experiment file (as given to plan and submit), its name (under --outputs) or the
    folder outputs/<name>."""
    if experiment.is_file():
        folder = outputs / _load(experiment, require_model=False).name
    else:
        folder = experiment if experiment.is_dir() else outputs / experiment
    if not folder.is_dir():
        errors.print(f"error: no experiment folder {folder} (run `distinfer plan` or `submit` first)")
        raise typer.Exit(2)
    return folder.parent, folder.name


@app.command()
def status(
    experiment: Path = typer.Argument(..., help="Experiment file, its name, or its outputs folder."),
    outputs: Path = typer.Option(Path("outputs"), help="Folder for run bundles."),
    watch: bool = typer.Option(False, "--watch", help="Refresh the table until every run has ended."),
    interval: float = typer.Option(10.0, help="Seconds between refreshes with --watch.", min=0.5),
) -> None:
    """Each run's Slurm state (squeue, sacct) beside its bundle state."""
    from rich.live import Live

    from distinfer.jobs import LIVE_STATES
    from distinfer.jobs import status as run_status
    from distinfer.slurm import SlurmError

    root, name = _experiment_dir(experiment, outputs)

    def table() -> tuple[Table, bool]:
        with _exit_on(SlurmError, 1):
            rows = run_status(root, name)
        shown = Table(title=f"{name}" + (f" (every {interval:g} s; Ctrl-C stops watching)" if watch else ""))
        for column in ("run", "job", "slurm", "bundle"):
            shown.add_column(column, no_wrap=column == "run")
        for row in rows:
            shown.add_row(row.run_id, row.job_id or "-", row.slurm_state, row.bundle_state)
        ended = all(r.slurm_state not in LIVE_STATES and r.bundle_state != "unfinished" for r in rows)
        return shown, ended

    shown, ended = table()
    if not watch:
        console.print(shown)
        return
    try:
        with Live(shown, console=console, auto_refresh=False) as live:
            while not ended:
                time.sleep(interval)
                shown, ended = table()
                live.update(shown, refresh=True)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    console.print("every run has ended")


@app.command()
def cancel(
    experiment: Path = typer.Argument(..., help="Experiment file, its name, or its outputs folder."),
    outputs: Path = typer.Option(Path("outputs"), help="Folder for run bundles."),
) -> None:
    """Cancel the experiment's queued and running jobs."""
    from distinfer.jobs import cancel as cancel_jobs
    from distinfer.slurm import SlurmError

    root, name = _experiment_dir(experiment, outputs)
    with _exit_on(SlurmError, 1):
        cancelled = cancel_jobs(root, name)
    console.print(f"cancelled: {', '.join(cancelled) or 'nothing was queued or running'}")


@app.command()
def collect(
    experiment: Path = typer.Argument(..., help="Experiment file, its name, or its outputs folder."),
    outputs: Path = typer.Option(Path("outputs"), help="Folder for run bundles."),
) -> None:
    """Store sacct accounting (state, elapsed, nodes, exit code, MaxRSS) as slurm.json in each run's bundle."""
    from distinfer.jobs import collect as collect_jobs
    from distinfer.slurm import SlurmError

    root, name = _experiment_dir(experiment, outputs)
    with _exit_on(SlurmError, 1):
        count = collect_jobs(root, name)
    console.print(f"accounting stored for {count} run(s)")


@app.command()
def analyze(
    experiments: list[Path] = typer.Argument(..., help="Experiment folders under outputs/ (outputs/<exp>)."),
    out: Path = typer.Option(Path("analysis"), help="Where analysis/<exp>/ is written."),
) -> None:
    """Tables (parquet, csv, json), plots (PNG, SVG) and report.md/.html for each experiment folder; with several,
    also an overview with every plot (analysis/report.html)."""
    from distinfer.analysis.analyze import analyze as analyze_experiment
    from distinfer.analysis.report import write_overview

    results = []
    for folder in experiments:
        if not folder.is_dir():
            errors.print(f"error: {folder} is not an experiment folder (expected outputs/<experiment>)")
            raise typer.Exit(2)
        result = analyze_experiment(folder, out, experiments)
        results.append(result)
        console.print(f"{folder.name}: {result.runs} run(s) analysed, {len(result.problems)} problem(s) listed; "
                      f"report: {result.out / 'report.html'}", highlight=False)
        for problem in result.problems:
            console.print(f"  [yellow]problem:[/] {problem['run_id']}: {problem['problem']}", highlight=False)
        for warning in result.warnings:
            console.print(f"  [yellow]warning:[/] {warning}", highlight=False)
    if len(results) > 1:
        console.print(f"every plot of the {len(results)} experiments: {write_overview(results, out)}", highlight=False)


@app.command("compare")
def compare_cmd(
    base: Path = typer.Argument(..., help="The baseline: an experiment's output folder, or a folder of them."),
    new: Path = typer.Argument(..., help="The study to judge against it (the same kinds of folder)."),
    threshold: list[str] = typer.Option(["5%"], help="The change a verdict needs: 5% for every metric, and "
                                        "METRIC=10% for one (repeat the option)."),
    metric: list[str] = typer.Option([], help="Compare only these metrics (repeat the option)."),
    out: Path = typer.Option(Path("compare"), help="Where compare.csv and compare.html are written."),
    base_repeat: list[Path] = typer.Option([], help="Another run of the baseline study (repeat the option): "
                                           "the drift between them widens every interval."),
) -> None:
    """Runs matched by what they measured; each metric's change with a 95 % bootstrap interval and a verdict
    (improved, regressed, unchanged). Exit status 1 when a run regressed beyond its threshold with confidence."""
    from distinfer.analysis.compare import CompareError, compare, parse_thresholds, write_outputs

    with _exit_on(CompareError, 2):
        defaults = [t for t in threshold if "=" not in t]
        thresholds = parse_thresholds(defaults[-1] if defaults else "5%", [t for t in threshold if "=" in t])
        table, only_base, only_new = compare(base, new, thresholds, metric or None, base_repeats=base_repeat)
    grid = Table(title=f"{new} against {base}")
    for column in ("run", "metric", "base", "new", "change", "95 % interval", "verdict"):
        grid.add_column(column, justify="left" if column in ("run", "metric", "verdict") else "right")
    styles = {"regressed": "bold red", "improved": "green", "unchanged": ""}
    for r in table.itertuples():
        interval = r.note or f"{100 * r.change_low:+.1f}% .. {100 * r.change_high:+.1f}%"
        grid.add_row(str(r.run_id), r.metric, f"{r.base:.4g}", f"{r.new:.4g}", f"{100 * r.change:+.1f}%", interval,
                     f"[{styles[r.verdict]}]{r.verdict}[/]" if styles[r.verdict] else r.verdict)
    console.print(grid)
    for side, ids in (("BASE", only_base), ("NEW", only_new)):
        if ids:
            console.print(f"only in {side} (not compared): {', '.join(ids)}", highlight=False)
    if not base_repeat and table["confident"].any() and (table["verdict"] != "unchanged").any():
        console.print("note: the intervals cover the variation inside each run, not a machine's drift from one run "
                      "to the next; run the baseline study again and give it as --base-repeat to include that",
                      highlight=False)
    folder = write_outputs(table, out, base, new, only_base, only_new)
    regressed = table[(table["verdict"] == "regressed") & table["confident"]]
    counts = table["verdict"].value_counts().to_dict()
    console.print(f"{len(table)} comparison(s) of {table['run_id'].nunique()} run(s): "
                  + ", ".join(f"{counts.get(v, 0)} {v}" for v in ("regressed", "improved", "unchanged"))
                  + f"; {folder / 'compare.csv'}, {folder / 'compare.html'}", highlight=False)
    if len(regressed):
        raise typer.Exit(1)


@app.command()
def serve(
    config: Path = typer.Argument(..., help="Experiment file (YAML)."),
    run_id: str = typer.Option(None, "--run", help="Which run's layout to serve (default: the first one-rank run)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    max_batch: int = typer.Option(32, help="Requests decoded together at most.", min=1),
    api_key: str = typer.Option(None, envvar="DISTINFER_API_KEY", show_default=False, show_envvar=True,
                                help="Ask clients of /v1 for this key (Authorization: Bearer KEY); 401 without it."),
    log_requests: bool = typer.Option(False, "--log-requests", help="Log one line per request (status, tokens, "
                                      "latency); refused and failed requests are always logged."),
) -> None:
    """Serve one run's model behind an OpenAI-compatible API (/v1/completions, /v1/models, /health, /metrics)
    with continuous batching, until Ctrl-C or SIGTERM."""
    import os

    from distinfer.engines import capabilities
    from distinfer.plan import expand, resolve_builtin_models
    from distinfer.serving.serve import API_KEY_ENV, served_name
    from distinfer.serving.serve import serve as serve_run

    exp = _load(config)
    _need_runtime("serve")
    runs = [r for r in expand(exp, config) if capabilities(r.engine).served_by_distinfer]
    chosen = [r for r in runs if r.run_id == run_id] if run_id else [r for r in runs if r.world_size == 1][:1]
    if not chosen:
        errors.print(f"error: {config}: no run {run_id!r}; runs: {', '.join(r.run_id for r in runs)}" if run_id else
                     f"error: {config}: no one-rank run to serve; runs: {', '.join(r.run_id for r in runs)}")
        raise typer.Exit(2)
    run = resolve_builtin_models(chosen)[0]
    if api_key:  # the ranks read it from their environment: never on a command line, never logged
        os.environ[API_KEY_ENV] = api_key
    console.print(f"serving {run.run_id} as model {served_name(run)!r} on http://{host}:{port} (Ctrl-C stops)"
                  + ("; clients need the API key" if api_key else ""), highlight=False)
    with _exit_on(ValueError, 2), _exit_on(RuntimeError, 1):  # a bad run; ranks that failed (their log above)
        serve_run(run, host, port, max_batch, log_requests=log_requests)


@app.command("mock-server")
def mock_server(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8100, help="Port to listen on."),
    model: str = typer.Option("mock", help="The model name it serves."),
    ttft_ms: float = typer.Option(0.0, "--ttft-ms", min=0.0, max=3_600_000.0, help="Time to each first token."),
    itl_ms: float = typer.Option(0.0, "--itl-ms", min=0.0, max=3_600_000.0, help="Time between tokens."),
) -> None:
    """A streaming OpenAI-compatible server with no model (/v1/completions, /v1/chat/completions), answering at set
    times: what a client host can drive, measured before booking GPU nodes."""
    import math

    from distinfer.serving.mock import run

    if not (math.isfinite(ttft_ms) and math.isfinite(itl_ms)):
        errors.print("error: --ttft-ms and --itl-ms take finite milliseconds")
        raise typer.Exit(2)
    console.print(f"mock server for model {model!r} on http://{host}:{port}: first token after {ttft_ms:g} ms, then "
                  f"one every {itl_ms:g} ms (Ctrl-C stops)", highlight=False)
    run(host, port, model, ttft_ms, itl_ms)


@models_app.command("build-tiny")
def build_tiny(
    name: list[str] = typer.Option(["tiny-llama", "tiny-gpt2"], "--name", help="Which built-in model(s)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if cached."),
    trained: bool = typer.Option(False, "--trained", help="Build the trained variants (<name>-trained): a short, "
                                 "deterministic, offline training, so that accuracy figures mean something."),
) -> None:
    """Build the built-in tiny models offline (cached in $DISTINFER_CACHE or ~/.cache/distinfer)."""
    from distinfer.models.tiny import TINY_MODELS, build_tiny_model

    _need_runtime("models build-tiny")
    for n in (f"{n}-trained" if trained and not n.endswith("-trained") else n for n in name):
        if n not in TINY_MODELS:
            errors.print(f"error: unknown built-in model {n!r}; allowed: {', '.join(TINY_MODELS)}")
            raise typer.Exit(2)
        console.print(f"{n}: {build_tiny_model(n, force=force)}")
