"""The one way benches and tests write an experiment file and run it as a user does.

`experiment_file` writes the experiment of a mapping (YAML), over defaults that run on this machine: the
built-in tiny Llama and the shipped correctness prompts; `body` adds YAML text as a test would type it.
`run_local` is `distinfer run FILE --local` in a subprocess, and `run_specs` the runs the file plans.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PROMPTS = REPO / "prompts" / "correctness.jsonl"


def experiment_file(path: Path, name: str = "t", body: str = "", **fields: object) -> Path:
    """Write experiment `name` to `path`: the tiny Llama and the correctness prompts unless `fields` say
    otherwise, then the sections of `body` (YAML text) over both. Returns `path`."""
    data: dict = {"name": name, "model": {"builtin": "tiny-llama"}, "prompts": str(PROMPTS)}
    data.update(fields)
    data.update(yaml.safe_load(body) or {})
    path.write_text(yaml.safe_dump(data, sort_keys=False, width=200))
    return path


def run_local(config: Path, *options: str, cwd: Path | None = None,
              timeout: float = 3600) -> subprocess.CompletedProcess:
    """`distinfer run CONFIG --local OPTIONS...` as a user runs it; output captured."""
    return subprocess.run([sys.executable, "-m", "distinfer", "run", str(config), "--local", *options],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)


def run_specs(config: Path) -> list:
    """The runs (plan.RunSpec) the experiment file plans, in plan order."""
    from distinfer.plan import expand
    from distinfer.spec import load_experiment

    return expand(load_experiment(config), config)
