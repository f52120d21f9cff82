"""report.md and report.html: plots, key tables, every run's state, provenance."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from distinfer.analysis.bundles import LoadedExperiment


def _fmt(value: object) -> str:
    """A cell: empty where there is no value (never `None` or `nan`), floats to four digits."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "_none_\n"
    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    rows = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *rows]) + "\n"


def _html_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "<p><em>none</em></p>"
    return frame.map(_fmt).to_html(index=False, escape=True)


def _provenance(loaded: LoadedExperiment) -> pd.DataFrame:
    rows = []
    for run_id, prov in loaded.provenance.items():
        packages = prov.get("packages") or {}
        slurm = prov.get("slurm") or {}
        rows.append({"run_id": run_id, "git_commit": prov.get("git_commit"), "torch": packages.get("torch"),
                     "transformers": packages.get("transformers"), "deepspeed": packages.get("deepspeed"),
                     "hosts": ",".join((prov.get("runtime") or {}).get("hostnames", [])),
                     "device": (prov.get("runtime") or {}).get("device"), "slurm_job": slurm.get("JobID")})
    return pd.DataFrame(rows)


MAX_ROWS = 100  # rows a report table shows; the CSV beside it has them all


def _shown(frame: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    if len(frame) <= MAX_ROWS:
        return frame, ""
    return frame.head(MAX_ROWS), f"first {MAX_ROWS} of {len(frame)} rows; every row is in the CSV file"


def write_report(loaded: LoadedExperiment, tables: dict[str, pd.DataFrame], plots: list[str], out: Path) -> None:
    """Both reports from the same sections; plots are referenced by their relative SVG/PNG paths."""
    states = pd.DataFrame(
        [{"run_id": r, "state": "ok"} for r in loaded.runs.get("run_id", [])]
        + [{"run_id": p["run_id"], "state": p["problem"]} for p in loaded.problems]
    )
    key = ["run_id", "engine", "world_size", "layout", "batch_size", "microbatches", "precision", "context_tokens",
           "output_tokens", "output_tokens_per_s", "ttft_p50_s", "tpot_p50_s", "itl_p99_s", "e2e_p90_s", "peak_memory_bytes"]
    results = tables["results"]
    empty = pd.DataFrame()
    studies = [("Strong scaling", "strong_scaling", "strong-scaling"), ("Weak scaling", "weak_scaling", "weak-scaling"),
               ("Batch sweep", "batch_sweep", "batch-sweep"),
               ("Precision and quantization (against the baseline precision)", "precision", "precision-sweep"),
               ("Optimization against the baseline", "optimization", "optimization"),
               ("Serving: each layout's highest load meeting the SLOs", "serving_knee", "serving"),
               ("Serving: every load", "serving", "serving")]
    # The study the experiment names comes first; the other tables follow when they have rows.
    lead = "serving" if "serving" in tables else loaded.study
    studies.sort(key=lambda s: s[2] != lead)
    sections = [
        ("Runs and their states", states),
        ("Results (all columns: results.csv)", results[[c for c in key if c in results]]),
        *((heading, tables.get(name, empty)) for heading, name, study in studies
          if study == loaded.study or name in tables),
        ("Correctness against the reference", tables.get("correctness", empty)),
        ("Time per rank: compute, communication, waiting", tables.get("time_breakdown", empty)),
        ("Mixture of experts: tokens per expert, balance and all-to-all share", tables.get("experts", empty)),
        ("What the requests held: lengths reported and planned, TTFT by prefix group and by session turn",
         tables.get("workload", empty)),
        ("Predicted against measured (the performance model; error = predicted / measured - 1)",
         tables.get("prediction", empty)),
        ("Provenance", _provenance(loaded)),
    ]
    title = f"distinfer report: {loaded.name}, {lead} ({loaded.model} on {loaded.hardware})"
    md = [f"# {title}\n"]
    if loaded.problems:
        md.append("**Problems:** " + "; ".join(f"`{p['run_id']}`: {p['problem']}" for p in loaded.problems) + "\n")
    if loaded.warnings:
        md.append("**Warnings:** " + "; ".join(loaded.warnings) + "\n")
    md += [f"![{name}](plots/{name}.svg)\n" for name in plots]
    for heading, frame in sections:
        frame, note = _shown(frame)
        md += [f"## {heading}\n", *([f"_{note}_\n"] if note else []), markdown_table(frame)]
    (out / "report.md").write_text("\n".join(md))
    body = [f"<h1>{html.escape(title)}</h1>"]
    if loaded.problems:
        body.append("<h2>Problems</h2><ul>" + "".join(
            f"<li><code>{html.escape(p['run_id'])}</code>: {html.escape(p['problem'])}</li>" for p in loaded.problems)
            + "</ul>")
    if loaded.warnings:
        body.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in loaded.warnings)
                    + "</ul>")
    body += [f'<figure><img src="plots/{name}.svg" alt="{name}"></figure>' for name in plots]
    for heading, frame in sections:
        frame, note = _shown(frame)
        body += [f"<h2>{html.escape(heading)}</h2>", *([f"<p><em>{note}</em></p>"] if note else []),
                 _html_table(frame)]
    (out / "report.html").write_text(_html_page(title, body))


STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:auto} table{border-collapse:collapse;font-size:12px}"
         " td,th{border:1px solid #ccc;padding:2px 6px} img{max-width:100%}")


def _html_page(title: str, body: list[str]) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")


def write_overview(results: list, root: Path) -> Path:  # list[AnalysisResult]
    """analysis/report.md and report.html: every analysed experiment's plots on one page, with links to
    each experiment's own report (analysis/<exp>/report.html)."""
    md = ["# distinfer studies\n"]
    body = ["<h1>distinfer studies</h1>"]
    for result in results:
        name = result.out.name
        heading = f"{name}: {result.study}, {result.runs} run(s), {len(result.problems)} problem(s)"
        md += [f"## {heading}\n", f"[full report]({name}/report.md)\n"]
        md += [f"![{plot}]({name}/plots/{plot}.svg)\n" for plot in result.plots]
        body += [f"<h2>{html.escape(heading)}</h2>", f'<p><a href="{html.escape(name)}/report.html">full report</a></p>']
        body += [f'<figure><img src="{html.escape(name)}/plots/{plot}.svg" alt="{plot}"></figure>' for plot in result.plots]
    (root / "report.md").write_text("\n".join(md))
    path = root / "report.html"
    path.write_text(_html_page("distinfer studies", body))
    return path
