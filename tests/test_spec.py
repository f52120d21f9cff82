"""Experiment files: good ones expand into the right runs, bad ones are rejected with exit 2 and a clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from distinfer.plan import expand
from distinfer.spec import load_experiment

REPO = Path(__file__).resolve().parent.parent
BAD = sorted((REPO / "tests" / "bad_experiments").glob("*.yaml"))


def test_there_are_enough_bad_files() -> None:
    assert len(BAD) >= 10


def _rejection(path: Path, out: Path, in_process: bool) -> tuple[int, str, str]:
    """`distinfer run BAD --local` on a bad file: (exit code, stdout, stderr), in this process through Typer's
    runner, or as a user runs it."""
    args = ["run", str(path.relative_to(REPO)), "--local", "--outputs", str(out)]
    if not in_process:
        proc = subprocess.run([sys.executable, "-m", "distinfer", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        return proc.returncode, proc.stdout, proc.stderr
    from typer.testing import CliRunner

    from distinfer.cli import app

    result = CliRunner().invoke(app, args, prog_name="distinfer")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_bad_experiment_is_rejected_clearly(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each file of the corpus in this process (the CLI's code, fast); two of them as a user runs the command,
    for the exit code and the stderr of a real process."""
    monkeypatch.chdir(REPO)
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    code, stdout, stderr = _rejection(path, tmp_path / "out", in_process=path not in BAD[:2])
    assert code == 2, stdout + stderr
    message = " ".join(stderr.split())  # rich may wrap long lines
    assert expected in message, message
    assert str(path.relative_to(REPO)) in message.replace(" ", "") or path.name in message
    assert "Traceback" not in stderr + stdout
    assert not (tmp_path / "out").exists(), "nothing may be written for a rejected experiment"


def test_local_tiny_expands_to_the_cartesian_product() -> None:
    spec_file = REPO / "configs" / "local-tiny.yaml"
    runs = expand(load_experiment(spec_file), spec_file)
    ids = [r.run_id for r in runs]
    assert ids == ["reference-b1-fp32", "reference-b4-fp32", "pipeline-pp1-b1-mb1-fp32", "pipeline-pp1-b4-mb1-fp32",
                   "pipeline-pp2-b1-mb1-fp32", "pipeline-pp2-b4-mb1-fp32"]
    assert {r.world_size for r in runs} == {1, 2}


def test_explicit_layer_lists_set_the_stage_count(tmp_path: Path) -> None:
    spec_file = tmp_path / "e.yaml"
    spec_file.write_text(
        f"name: uneven\nmodel: {{builtin: tiny-gpt2}}\nprompts: {REPO / 'prompts/correctness.jsonl'}\n"
        "parallel: {layers: [[3, 5], [1, 5, 2]], microbatches: [1, 2]}\nbatch_size: 4\nreference: none\n"
    )
    runs = expand(load_experiment(spec_file), spec_file)
    assert [(r.pp, r.layers, r.microbatches) for r in runs] == [
        (2, [3, 5], 1), (2, [3, 5], 2), (3, [1, 5, 2], 1), (3, [1, 5, 2], 2)]
    assert len({r.config_hash() for r in runs}) == 4


def test_tp_sweeps_pipeline_stages_and_deepspeed_alike(tmp_path: Path) -> None:
    """tp 1 and 2 of both engines, except DeepSpeed's tp 1 (AutoTP on one rank splits nothing: the reference)."""
    spec_file = tmp_path / "e.yaml"
    spec_file.write_text(
        f"name: t\nmodel: {{builtin: tiny-llama}}\nprompts: {REPO / 'prompts/correctness.jsonl'}\n"
        "parallel: {engine: [reference, pipeline, deepspeed], pp: 2, tp: [1, 2], microbatches: 2}\nbatch_size: 4\n")
    runs = {r.run_id: r for r in expand(load_experiment(spec_file), spec_file)}
    assert set(runs) == {"reference-b4-fp32", "pipeline-pp2-b4-mb2-fp32", "pipeline-pp2-tp2-b4-mb2-fp32",
                         "deepspeed-tp2-b4-fp32"}
    assert runs["pipeline-pp2-tp2-b4-mb2-fp32"].world_size == 4 and runs["deepspeed-tp2-b4-fp32"].world_size == 2


def test_validation_does_not_import_torch() -> None:
    code = ("import sys; from distinfer.spec import load_experiment; from distinfer.plan import expand; "
            "import distinfer.cli; e = load_experiment('configs/local-tiny.yaml'); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_studies_plan_their_references_and_weak_scaling_grows_the_prompts() -> None:
    spec_file = REPO / "configs" / "local-weak.yaml"
    runs = {r.run_id: r for r in expand(load_experiment(spec_file), spec_file)}
    assert [(r.world_size, r.num_prompts) for r in runs.values() if r.engine == "pipeline"] == [(1, 4), (2, 8), (3, 12)]
    assert runs["reference-b4-fp32-n12"].num_prompts == 12, "one reference covers every run's prompts"
    spec_file = REPO / "configs" / "local-precision.yaml"
    runs = {r.run_id: r for r in expand(load_experiment(spec_file), spec_file)}
    assert {r.run_id for r in runs.values() if r.engine == "reference"} == {
        "reference-b4-fp32", "reference-b4-fp16", "reference-b4-bf16", "reference-b4-int8"}
    assert (runs["pipeline-pp1-b4-mb1-int8"].quantization, runs["pipeline-pp1-b4-mb1-int8"].dtype) == ("int8", "float32")
    spec_file = REPO / "configs" / "local-long-context.yaml"
    runs = {r.run_id: r for r in expand(load_experiment(spec_file), spec_file)}
    assert runs["pipeline-pp2-b2-mb1-fp32-ctx2048"].generation.max_prompt_tokens == 2048


def test_status_cancel_collect_take_the_experiment_file_too(tmp_path: Path) -> None:
    """The commands after submit find the experiment's folder from the file given to plan and submit; before a
    plan they say which folder is missing (no Slurm is called then)."""
    config = REPO / "configs" / "local-tiny.yaml"
    for command in ("status", "cancel", "collect"):
        proc = subprocess.run([sys.executable, "-m", "distinfer", command, str(config), "--outputs", str(tmp_path)],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert f"noexperimentfolder{tmp_path / 'local-tiny'}" in "".join(proc.stderr.split())  # rich may wrap
        assert "Traceback" not in proc.stderr
