"""The memory plan: OpenLLaMA-3B v2 on a T4, with the numbers the plan must show."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from distinfer.layout import split_layers
from distinfer.memory import ModelFacts, estimate_stage_memory
from distinfer.profiles import GIB, HARDWARE

REPO = Path(__file__).resolve().parent.parent
FACTS = ModelFacts.from_config(json.loads((REPO / "configs/models/open_llama_3b_v2.config.json").read_text()))
T4 = HARDWARE["t4-16gb"]


def estimate(dtype: str, batch: int, context: int, stages: int = 1, stage: int = 0):  # noqa: ANN201
    layout = split_layers(FACTS.layers, stages)[stage]
    return estimate_stage_memory(FACTS, layout, dtype, batch, context, T4.memory_bytes, gpu=True)


def test_openllama_3b_sizes() -> None:
    assert abs(FACTS.total_parameters() / 1e9 - 3.43) < 0.01
    fp16 = estimate("float16", 8, 2048)
    assert abs(fp16.weights / 1e9 - 6.85) < 0.1 and abs(fp16.kv_cache / 1e9 - 5.45) < 0.05
    assert fp16.fits
    fp32 = estimate("float32", 8, 2048)
    assert abs(fp32.weights / GIB - 12.8) < 0.1 and not fp32.fits
    assert estimate("float32", 1, 128).fits
    halves = [estimate("float16", 8, 2048, 2, s).weights for s in (0, 1)]
    assert all(abs(h / fp16.weights - 0.5) < 0.02 for h in halves)


def test_plan_command_shows_what_fits(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "distinfer", "plan", str(REPO / "configs/openllama3b-t4-fp32.yaml"),
                           "--outputs", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "does not fit: pipeline-pp1-b8-mb1-fp32 needs 24.59 GiB" in proc.stdout
    assert "each stage holds only its layers" in proc.stdout
    written = sorted(p.parent.name for p in (tmp_path / "openllama3b-t4-fp32").glob("*/job.sbatch"))
    assert written == ["pipeline-pp1-b1-mb1-fp32", "pipeline-pp2-b1-mb1-fp32", "pipeline-pp2-b8-mb1-fp32",
                       "reference-b1-fp32"], "the automatic fp32 reference fits at batch 1 only"
    assert "does not fit: reference-b8-fp32" in proc.stdout

