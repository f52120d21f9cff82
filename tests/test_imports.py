"""The import graph of src/ and bench/: separate parts, no cycles, and the CPU package fenced off."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def import_graph(root: Path, top_level_only: bool = False) -> dict[str, set[str]]:
    """Module -> the project modules it imports (with `top_level_only`, not those imported inside functions)."""
    modules = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[module] |= {n for n in names if n in modules and n != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_in_the_package_or_the_bench() -> None:
    assert cycles(import_graph(REPO / "src" / "distinfer")) == []
    assert cycles(import_graph(REPO / "bench")) == []


def test_the_parts_import_only_what_they_stand_on() -> None:
    graph = import_graph(REPO / "src" / "distinfer")
    runtime = {m for m in graph if m.startswith("distinfer.runtime")}
    analysis = {m for m in graph if m.startswith("distinfer.analysis")}
    planning = {"distinfer.spec", "distinfer.layout", "distinfer.plan", "distinfer.memory", "distinfer.profiles",
                "distinfer.slurm", "distinfer.jobs", "distinfer.bundle", "distinfer.launchers.base",
                "distinfer.launchers.slurm"}
    for module in planning | analysis:
        assert not graph[module] & runtime, f"{module} imports the runtime"
    for module in runtime:
        assert not graph[module] & (analysis | {"distinfer.cli", "distinfer.jobs"}), f"{module} imports {graph[module]}"
    assert not graph["distinfer.jobs"] & {"distinfer.launchers.local"}, "planning for Slurm needs no local launcher"
    load_generator = {f"distinfer.serving.{m}" for m in ("schedule", "workload", "client", "metrics", "records",
                                                          "runner")}
    for module in load_generator | {"distinfer.scenario"}:
        assert not graph[module] & runtime, f"{module}: the load generator runs without the runtime"
    for module in analysis:
        assert not graph[module] & (planning - {"distinfer.bundle"}), "the analysis reads bundles only"


def test_a_cuda_rank_imports_nothing_of_the_cpu_package() -> None:
    """Outside runtime/cpu/, the CPU package is imported only inside functions that a CPU rank runs."""
    top = import_graph(REPO / "src" / "distinfer", top_level_only=True)
    for module, imported in top.items():
        if not module.startswith("distinfer.runtime.cpu"):
            assert not {m for m in imported if m.startswith("distinfer.runtime.cpu")}, module


def test_the_login_node_commands_import_no_torch(tmp_path: Path) -> None:
    """validate, plan, predict and analyze of a study (T4 configs, OpenLLaMA's config file; local-tiny with the
    built-in tokenizer) run without torch or transformers in sys.modules, checked after each command."""
    import subprocess
    import sys

    out = tmp_path / "outputs"
    commands = [["validate", "configs/local-tiny.yaml"],
                ["plan", "configs/openllama3b-t4-strong.yaml", "--outputs", str(out)],
                ["predict", "configs/openllama3b-t4-serving.yaml", "--outputs", str(out)],
                ["predict", "configs/local-serving.yaml", "--outputs", str(out)],
                ["analyze", str(out / "openllama3b-t4-strong"), "--out", str(tmp_path / "analysis")]]
    script = ("import sys\nfrom distinfer.cli import app\n"
              f"for command in {commands!r}:\n"
              "    try:\n        app(command, prog_name='distinfer', standalone_mode=False)\n"
              "    except SystemExit:\n        pass\n"
              "    heavy = sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules)\n"
              "    print(command[0], 'imported', heavy or 'nothing heavy', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if " imported " in line]
    assert lines == [f"{c[0]} imported nothing heavy" for c in commands], proc.stdout[-3000:]


def test_the_performance_model_runs_no_probe_and_no_torch() -> None:
    """predict/ reads the probes' results only: it imports neither torch nor the probes (nor the runtime)."""
    graph = import_graph(REPO / "src" / "distinfer")
    for module in (m for m in graph if m.startswith("distinfer.predict")):
        assert not {m for m in graph[module] if m.startswith(("distinfer.probes", "distinfer.runtime"))}, module
        source = (REPO / "src" / Path(*module.split("."))).with_suffix(".py")
        if not source.exists():
            source = source.with_suffix("") / "__init__.py"
        assert "import torch" not in source.read_text(), module
