"""Tensor and expert parallel inside pipeline stages: `distinfer run --local` of tp 2 (two gloo ranks) and of
pp 2 x tp 2 (four gloo ranks, a 2-D device mesh) on the tiny Llama and GPT-2, and of ep 2 and pp 2 x ep 2 on the tiny
mixture of experts, equals the single-device reference token for token (fp32, greedy), with left padding (batch
4, prompts of different lengths) and micro-batches; and the memory plan divides each stage by tp."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def completions(run_dir: Path) -> dict[str, list[int]]:
    return {row["id"]: row["output_token_ids"]
            for row in map(json.loads, (run_dir / "completions.jsonl").read_text().splitlines())}


@pytest.fixture(scope="session")
def tiny_moe() -> Path:
    from distinfer.models.tiny import build_tiny_model

    return build_tiny_model("tiny-moe")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:  # noqa: ANN001
    """One outputs folder for the module: the cases of one model share its reference run (done once, then
    skipped as finished)."""
    return tmp_path_factory.mktemp("split-outputs")


@pytest.mark.parametrize(("model", "parallel", "run_id", "ranks"), [
    ("tiny-llama", "{engine: [reference, pipeline], pp: 1, tp: 2}", "pipeline-pp1-tp2-b4-mb1-fp32", 2),
    ("tiny-llama", "{engine: [reference, pipeline], pp: 2, tp: 2, microbatches: 2}", "pipeline-pp2-tp2-b4-mb2-fp32", 4),
    ("tiny-gpt2", "{engine: [reference, pipeline], pp: 2, tp: 2, microbatches: 2}", "pipeline-pp2-tp2-b4-mb2-fp32", 4),
    ("tiny-moe", "{engine: [reference, pipeline], pp: 1, ep: 2}", "pipeline-pp1-ep2-b4-mb1-fp32", 2),
    ("tiny-moe", "{engine: [reference, pipeline], pp: 2, ep: 2, microbatches: 2}", "pipeline-pp2-ep2-b4-mb2-fp32", 4),
])
def test_split_stages_equal_the_reference(tmp_path: Path, outputs: Path, tiny_models, tiny_moe, model: str,  # noqa: ANN001
                                          parallel: str, run_id: str, ranks: int) -> None:
    config = tmp_path / "split.yaml"
    config.write_text(f"name: split\nmodel: {{builtin: {model}}}\nprompts: {REPO / 'prompts/correctness.jsonl'}\n"
                      f"generation: {{max_new_tokens: 8}}\nparallel: {parallel}\nbatch_size: 4\n"
                      "benchmark: {warmup: 0}\n")
    proc = subprocess.run([sys.executable, "-m", "distinfer", "run", str(config), "--local", "--outputs",
                           str(outputs / model)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = outputs / model / "split"
    summary = json.loads((out / run_id / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["world_size"] == ranks
    index = "tp_rank" if "-tp" in run_id else "ep_rank"
    split = [r for r in summary["ranks"] if r.get(index) is not None]
    assert sorted((r["stage"], r[index]) for r in split) == [(s, i) for s in range(ranks // 2) for i in (0, 1)]
    first = {r["stage"]: r for r in split if r[index] == 0}
    assert all(r["parameters"] < first[r["stage"]]["parameters"] * 2 for r in split), "each rank holds a shard"
    if index == "ep_rank":  # each rank's two experts of four, and the tokens routed to them
        for r in split:
            assert sorted(map(int, r["expert_tokens"])) == [2 * r["ep_rank"], 2 * r["ep_rank"] + 1], r
            assert r["all_to_all_s"] > 0
        per_expert = [sum(r["expert_tokens"].get(str(e), 0) for r in split) for e in range(4)]
        assert min(per_expert) > 0 and max(per_expert) > 1.2 * min(per_expert), f"a router that chooses: {per_expert}"
    served, reference = completions(out / run_id), completions(out / "reference-b4-fp32")
    assert served == reference and len(served) == 20
    if index == "ep_rank":  # the analysis tables each expert's tokens, the balance and the all-to-all share
        analysis = subprocess.run([sys.executable, "-m", "distinfer", "analyze", str(out), "--out", str(tmp_path / "a")],
                                  capture_output=True, text=True, timeout=300)
        assert analysis.returncode == 0, analysis.stdout + analysis.stderr
        import pandas as pd

        table = pd.read_csv(tmp_path / "a/split/experts.csv")
        table = table[table["run_id"] == run_id]  # the folder holds the model's other split runs too
        assert len(table) == 4 * (ranks // 2)
        assert (table.groupby("stage")["share_of_stage"].sum().round(6) == 1).all()
        assert (table["stage_balance"] > 1).all() and table["all_to_all_share"].between(0, 1, inclusive="right").all()
        results = pd.read_csv(tmp_path / "a/split/results.csv").set_index("run_id")
        assert results.loc[run_id, "layout"] == ("pp2 x ep2" if ranks == 4 else "pp1 x ep2")


def test_the_plan_divides_each_stage_by_tp(tmp_path: Path) -> None:
    """OpenLLaMA-3B v2 on nodes of two T4s: pp 2 x tp 2 over two nodes holds a quarter of the decoder layers'
    weights per rank, and each tp group sits on one node in the job script."""
    proc = subprocess.run([sys.executable, "-m", "distinfer", "plan", str(REPO / "configs/openllama3b-t4-hybrid.yaml"),
                           "--outputs", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**__import__("os").environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pipeline-pp2-tp2" in proc.stdout and "per rank" in proc.stdout, proc.stdout
    script = next((tmp_path / "openllama3b-t4-hybrid").glob("pipeline-pp2-tp2-*/job.sbatch")).read_text()
    assert "#SBATCH --nodes=2" in script and "--nproc-per-node=2" in script and "#SBATCH --gpus-per-node=2" in script
