"""The engines' capability table (engines.py) is the one place their rules are written."""

from __future__ import annotations

import re
from pathlib import Path

from distinfer.engines import ENGINES, SELECTABLE, capabilities
from distinfer.spec_schema import Engine

REPO = Path(__file__).resolve().parent.parent
AXES = ("pp", "tp", "ep", "microbatches", "int8", "serves_tp")


def test_every_engines_capabilities_come_from_the_table_alone() -> None:
    listed = {name: {axis for axis in AXES if getattr(e, axis)} | {f"program {e.program}"}
              | ({"served by distinfer"} if e.served_by_distinfer else set())
              | ({"one device"} if e.single_device else set()) | ({f"tp >= {e.min_tp}"} if e.min_tp > 1 else set())
              for name, e in ENGINES.items()}
    assert listed == {
        "pipeline": {"pp", "tp", "ep", "microbatches", "int8", "program ranks", "served by distinfer"},
        "reference": {"int8", "program ranks", "served by distinfer", "one device"},
        "deepspeed": {"tp", "serves_tp", "program ranks", "served by distinfer", "tp >= 2"},
        "vllm": {"pp", "tp", "serves_tp", "program vllm"},
        "endpoint": {"program endpoint"},
    }
    assert set(SELECTABLE) == set(Engine.__args__), "parallel.engine offers exactly the selectable engines"


def test_the_axes_an_engine_does_not_take_are_one() -> None:
    assert capabilities("reference").axes(4, [2, 2, 2, 2], 2, 2, 2) == (1, None, 1, 1, 1)
    assert capabilities("deepspeed").axes(4, None, 2, 1, 1) is None, "AutoTP on one rank is the reference"
    assert capabilities("deepspeed").axes(4, None, 2, 2, 2) == (1, None, 1, 2, 1)
    assert capabilities("vllm").axes(2, [3, 5], 4, 2, 2) == (2, [3, 5], 1, 2, 1)
    assert capabilities("pipeline").layout_tag(2, [3, 5], 2, 1) == "-pp2-L3.5-tp2"
    assert capabilities("deepspeed").layout_tag(1, None, 2, 1) == "-tp2"
    assert [capabilities(e).groups(2, 3) for e in ("pipeline", "vllm", "deepspeed")] == [3, 2, 1]


def test_no_module_decides_by_an_engines_name() -> None:
    """Outside the table, code asks the capabilities; only the runners (the registry of the ranks' engines and
    vLLM's program) name an engine, and the planner names the reference it adds."""
    by_name = re.compile(r"""engine(?:"\]|"\))?\s*(==|!=|in|not in)\s*[("']""")
    allowed = {"engines.py", "runtime/engines.py"}
    found = []
    for path in sorted((REPO / "src" / "distinfer").rglob("*.py")):
        name = str(path.relative_to(REPO / "src" / "distinfer"))
        if name in allowed:
            continue
        found += [f"{name}:{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1)
                  if by_name.search(line)]
    assert found == []
