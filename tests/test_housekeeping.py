"""Defects found by trying distinfer as a new user would, each with a test that would catch it again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pandas as pd
import pytest

from distinfer.jobs import estimate_run, plan_experiment
from distinfer.layout import Layout, LayoutError
from distinfer.memory import ModelFacts
from distinfer.plan import expand
from distinfer.runtime.monitor import nvml_target
from distinfer.slurm import RenderError, render_sbatch
from distinfer.spec import load_experiment

REPO = Path(__file__).resolve().parent.parent
OPENLLAMA = REPO / "configs" / "models" / "open_llama_3b_v2.config.json"


def t4_experiment(tmp_path: Path, parallel: str, cluster: str, extra: str = "") -> Path:
    config = tmp_path / "e.yaml"
    config.write_text(f"name: t4\nmodel: {{path: /cluster/models/open_llama_3b_v2, config: {OPENLLAMA}, "
                      f"dtype: float16}}\nprompts: {REPO / 'prompts/correctness.jsonl'}\nparallel: {parallel}\n"
                      f"cluster: {{profile: t4-16gb, {cluster}}}\n{extra}")
    return config


def test_a_pipeline_over_fixed_nodes_is_accepted_with_its_reference_on_one_node(tmp_path: Path) -> None:
    """`pp: [2]` with `cluster.nodes: 2` and the default `reference: auto`: the pipeline spans two nodes, the
    single-device reference takes one."""
    config = t4_experiment(tmp_path, "{pp: [2]}", "nodes: 2, gpus_per_node: 1")
    exp = load_experiment(config, require_model=False)
    planned = {p.run.run_id: p for p in plan_experiment(exp, config, tmp_path / "out")}
    assert set(planned) == {"pipeline-pp2-b1-mb1-fp16", "reference-b1-fp16"}
    pipeline = (tmp_path / "out/t4/pipeline-pp2-b1-mb1-fp16/job.sbatch").read_text()
    reference = (tmp_path / "out/t4/reference-b1-fp16/job.sbatch").read_text()
    assert "#SBATCH --nodes=2" in pipeline and "--nproc-per-node=1" in pipeline
    assert "#SBATCH --nodes=1" in reference


def test_layout_places_ranks_and_names_the_field_at_fault() -> None:
    layout = Layout(pp=2, tp=2, gpus_per_node=2)
    assert (layout.world_size, layout.nodes_needed, layout.ranks_per_node) == (4, 2, 2)
    assert [(c.stage, c.tp_rank, c.node) for c in map(layout.coordinates, range(4))] == [
        (0, 0, 0), (0, 1, 0), (1, 0, 1), (1, 1, 1)], "a tensor-parallel group sits on one node"
    with pytest.raises(LayoutError) as bad:
        Layout(pp=2, tp=2, gpus_per_node=1)
    assert bad.value.field == "parallel.tp" and "one node" in str(bad.value)
    with pytest.raises(LayoutError) as bad:
        Layout(pp=3, gpus_per_node=1, nodes=2)
    assert bad.value.field == "cluster.nodes"


def test_a_thousand_runs_plan_without_asking_git_each_time(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """Provenance (git, package versions) is gathered once per plan, not once per run."""
    import distinfer.provenance as provenance

    provenance.git_commit.cache_clear()
    provenance.package_versions.cache_clear()
    calls = []
    real_run = subprocess.run
    monkeypatch.setattr(provenance.subprocess, "run", lambda *a, **k: calls.append(a) or real_run(*a, **k))
    config = t4_experiment(tmp_path, "{pp: [1, 2, 4], microbatches: [1, 2]}", "gpus_per_node: 1",
                           "batch_size: [" + ", ".join(str(b) for b in range(2, 40)) + "]\n")
    planned = plan_experiment(load_experiment(config, require_model=False), config, tmp_path / "out")
    assert len(planned) > 200
    assert len(calls) <= 2, "git rev-parse and git status, once"


def test_tensor_parallel_memory_is_divided_by_tp(tmp_path: Path) -> None:
    config = t4_experiment(tmp_path, "{engine: [reference, deepspeed], tp: 2}", "gpus_per_node: 2",
                           "batch_size: 8\ngeneration: {max_new_tokens: 256, max_prompt_tokens: 1024}\n")
    exp = load_experiment(config, require_model=False)
    runs = {r.run_id: r for r in expand(exp, config)}
    facts = ModelFacts.from_config(json.loads(OPENLLAMA.read_text()))
    whole = estimate_run(runs["reference-b8-fp16"], facts, exp)
    split = estimate_run(runs["deepspeed-tp2-b8-fp16"], facts, exp)
    assert len(whole) == 1 and len(split) == 2
    embedding = facts.embedding_parameters() * 2 * 2  # input embedding and head, fp16, counted whole
    assert split[0].weights == pytest.approx((whole[0].weights - embedding) / 2 + embedding, rel=0.01)
    assert split[0].kv_cache == whole[0].kv_cache // 2


def test_nvml_samples_the_gpu_cuda_gave_the_rank() -> None:
    assert nvml_target(0, {}) == ("index", 0)
    assert nvml_target(1, {"CUDA_VISIBLE_DEVICES": "2,3"}) == ("index", 3)
    assert nvml_target(0, {"CUDA_VISIBLE_DEVICES": "GPU-8f2c,GPU-11aa"}) == ("uuid", "GPU-8f2c")


def test_config_hash_ignores_the_run_names_and_follows_what_it_runs() -> None:
    exp_file = REPO / "configs" / "local-tiny.yaml"
    run = expand(load_experiment(exp_file), exp_file)[0]
    import dataclasses

    assert dataclasses.replace(run, run_id="renamed", experiment="other").config_hash() == run.config_hash()
    assert dataclasses.replace(run, model_path="/elsewhere").config_hash() != run.config_hash()
    assert dataclasses.replace(run, batch_size=run.batch_size + 1).config_hash() != run.config_hash()


def test_lock_files_live_in_the_users_cache_and_refuse_a_planted_symlink(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001,E501
    from distinfer.runtime.extensions import exclusive_lock, lock_dir

    monkeypatch.setenv("DISTINFER_CACHE", str(tmp_path / "cache"))
    folder = lock_dir()
    assert folder == tmp_path / "cache" / "locks" and (folder.stat().st_mode & 0o777) == 0o700
    target = tmp_path / "victim"
    target.write_text("keep")
    (folder / "planted.lock").symlink_to(target)
    with pytest.raises(OSError), exclusive_lock(folder / "planted.lock"):
        pass
    assert target.read_text() == "keep"
    with exclusive_lock(folder / "fine.lock"):
        assert (folder / "fine.lock").exists()


def test_an_outputs_path_with_a_percent_sign_is_refused(tmp_path: Path) -> None:
    config = t4_experiment(tmp_path, "{pp: 2}", "gpus_per_node: 1")
    exp = load_experiment(config, require_model=False)
    run = expand(exp, config)[0]
    with pytest.raises(RenderError, match="cannot go in #SBATCH lines"):
        render_sbatch(run, exp.cluster, exp.container, Path("/scratch/%u/out"))


def test_third_party_lines_stay_off_the_terminal(tmp_path: Path) -> None:
    """Building a model imports transformers, which imports DeepSpeed and torchao: their lines go to the log."""
    env = {**os.environ, "DISTINFER_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "distinfer", "models", "build-tiny", "--name", "tiny-gpt2"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert "tiny-gpt2:" in out
    assert "Setting accelerator" not in out and "Failed to load" not in out and "WARNING" not in out, out


def _analyse_synthetic(tmp_path: Path, bundles: int, study: str) -> Path:
    sys.path.insert(0, str(REPO))
    from bench.harness import write_synthetic_experiment

    folder = write_synthetic_experiment(tmp_path / "outputs", "synth", bundles, study=study)
    proc = subprocess.run([sys.executable, "-m", "distinfer", "analyze", str(folder), "--out", str(tmp_path / "a")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return tmp_path / "a" / "synth"


def test_only_the_tables_and_plots_of_the_study_are_written(tmp_path: Path) -> None:
    out = _analyse_synthetic(tmp_path, 400, "strong-scaling")
    written = {p.stem for p in out.glob("*.csv")}
    assert {"results", "strong_scaling", "correctness", "time_breakdown"} <= written
    assert "weak_scaling" not in written and "optimization" not in written
    for csv in out.glob("*.csv"):
        assert len(pd.read_csv(csv).columns) > 1, f"{csv.name} has a header"
    report = (out / "report.html").read_text()
    assert ">None<" not in report and ">nan<" not in report
    assert "first 100 of" in report, "long tables are cut in the report, whole in the CSV"
    plots = {p.stem for p in (out / "plots").glob("*.svg")}
    assert plots == {"strong_scaling", "batch_sweep", "latency", "time_breakdown", "precision"}
    svg = (out / "plots" / "latency.svg").read_text()
    assert "fastest of" in svg, "a plot of many layouts shows the fastest and says so"


def test_a_precision_study_at_one_batch_size_gets_no_batch_sweep_plot(tmp_path: Path) -> None:
    """Runs of one batch size (here: the synthetic set cut to batch 4) have no batch sweep to draw."""
    sys.path.insert(0, str(REPO))
    from bench.harness import write_synthetic_experiment

    folder = write_synthetic_experiment(tmp_path / "outputs", "synth", 200, study="precision-sweep")
    for run in folder.iterdir():
        if "-b4-" not in run.name:
            for path in run.iterdir():
                path.unlink()
            run.rmdir()
    proc = subprocess.run([sys.executable, "-m", "distinfer", "analyze", str(folder), "--out", str(tmp_path / "a")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    plots = {p.stem for p in (tmp_path / "a" / "synth" / "plots").glob("*.svg")}
    assert "batch_sweep" not in plots and "precision" in plots
    assert not (tmp_path / "a" / "synth" / "batch_sweep.csv").exists()


def test_the_package_works_installed_not_only_from_a_checkout(tmp_path: Path) -> None:
    """`pip install .` (a wheel, not editable) into a fresh venv: plan and analyze run from elsewhere, and the
    package asks for what its base install uses."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(REPO)], check=True, timeout=300, capture_output=True)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # the dependencies come from this environment's site-packages (no index here); only distinfer is installed
    site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    ours = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    Path(site, "deps-from-the-test-venv.pth").write_text(ours + "\n")  # a plain path: its .pth files are not run
    wheel = next(wheels.glob("distinfer-*.whl"))
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300,
                   capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import distinfer; print(distinfer.__file__)"], cwd=elsewhere,
                           check=True, capture_output=True, text=True).stdout
    assert str(env_dir) in where, "the installed copy, not the checkout"
    requires = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.requires('distinfer'))"],
                              check=True, capture_output=True, text=True).stdout
    assert all(name in requires for name in ("pandas", "matplotlib", "pyarrow", "pydantic"))
    config = t4_experiment(elsewhere, "{pp: [1, 2]}", "gpus_per_node: 1")
    plan = subprocess.run([str(env_dir / "bin" / "distinfer"), "plan", str(config), "--outputs", "out"],
                          cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert (elsewhere / "out/t4/pipeline-pp2-b1-mb1-fp16/job.sbatch").read_text().startswith("#!/bin/bash")
    sys.path.insert(0, str(REPO))
    from bench.harness import write_synthetic_experiment

    folder = write_synthetic_experiment(elsewhere / "outputs", "synth", 30)
    analyze = subprocess.run([str(env_dir / "bin" / "distinfer"), "analyze", str(folder)], cwd=elsewhere,
                             capture_output=True, text=True, timeout=300)
    assert analyze.returncode == 0, analyze.stdout + analyze.stderr
    assert (elsewhere / "analysis/synth/report.html").is_file()


def test_seeded_sampling_draws_the_same_tokens_on_every_engine(tmp_path: Path) -> None:
    """Sampled runs are comparable: the reference (HF generate) and a pipeline of two stages with two
    micro-batches draw with the same per-prompt seeded generators, so fp32 completions are equal."""
    prompts = tmp_path / "p.jsonl"
    lines = (REPO / "prompts" / "correctness.jsonl").read_text().splitlines()[:4]
    prompts.write_text("\n".join(lines) + "\n")
    config = tmp_path / "e.yaml"
    config.write_text(f"name: sampled\nmodel: {{builtin: tiny-llama}}\nprompts: {prompts}\n"
                      "generation: {max_new_tokens: 8, sampling: sample, temperature: 0.9, top_k: 50, seed: 3}\n"
                      "parallel: {engine: [reference, pipeline], pp: 2, microbatches: 2}\nbatch_size: 4\n"
                      "benchmark: {warmup: 0}\n")
    proc = subprocess.run([sys.executable, "-m", "distinfer", "run", str(config), "--local", "--outputs",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    def tokens(run: str) -> list[list[int]]:
        lines = (tmp_path / "out" / "sampled" / run / "completions.jsonl").read_text().splitlines()
        return [json.loads(line)["output_token_ids"] for line in lines]

    reference, pipeline = tokens("reference-b4-fp32"), tokens("pipeline-pp2-b4-mb2-fp32")
    assert len(reference) == 4 and reference == pipeline


CHECK_PAGE = """<!doctype html><html><body><pre id="result">pending</pre>
<iframe id="f" src="report.html" width="1200" height="800"></iframe>
<script>
document.getElementById("f").addEventListener("load", () => {
  const doc = document.getElementById("f").contentDocument;
  const images = [...doc.images];
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src"));
  document.getElementById("result").textContent = JSON.stringify({images: images.length, broken});
});
</script></body></html>
"""


def test_the_html_report_loads_every_image_in_a_browser(tmp_path: Path) -> None:
    """The report opened in headless Chromium (Debian's), as a user opens it: every plot loads, and the page
    logs no console error."""
    out = _analyse_synthetic(tmp_path, 120, "strong-scaling")
    (out / "check.html").write_text(CHECK_PAGE)
    proc = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom",
                           (out / "check.html").as_uri()], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(tmp_path)})
    result = json.loads(proc.stdout.split('<pre id="result">')[1].split("</pre>")[0])
    assert result["images"] == len(list((out / "plots").glob("*.svg"))) >= 4 and result["broken"] == []
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if "report.html" in line], console


def test_run_progress_counts_runs_and_the_current_runs_completions(tmp_path: Path) -> None:
    """`run --local`'s progress bar: runs done of the matrix, and the completions rank 0 has written so far."""
    import io
    import time
    from types import SimpleNamespace

    from rich.console import Console

    from distinfer.cli import RunProgress

    run = SimpleNamespace(run_id="pipeline-pp2-b1-mb1-fp32", world_size=2)
    (tmp_path / run.run_id).mkdir()
    screen = io.StringIO()
    with RunProgress(Console(file=screen, force_terminal=True, width=160), 3, tmp_path) as progress:
        progress.started(run)
        (tmp_path / run.run_id / "completions.jsonl").write_text('{"id": 1}\n{"id": 2}\n{"id": 3}\n')
        deadline = time.monotonic() + 10
        while "3 completion(s)" not in progress.progress.tasks[0].fields["detail"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "pipeline-pp2-b1-mb1-fp32 (2 rank(s)): 3 completion(s)" in progress.progress.tasks[0].fields["detail"]
        progress.finished()
        assert progress.progress.tasks[0].completed == 1 and progress.progress.tasks[0].total == 3


def test_cpu_tensor_parallel_ranks_may_span_nodes_gpu_ones_may_not() -> None:
    from distinfer.layout import place

    assert place(1, 2, gpu=False, gpus_per_node=0, nodes=None).nodes_needed == 2
    with pytest.raises(LayoutError, match="must sit on one node"):
        place(1, 2, gpu=True, gpus_per_node=1, nodes=None)


def test_a_base_install_says_what_running_models_needs() -> None:
    """Without PyTorch (a login node's base install) the model commands end with one clear line, exit 2."""
    script = ("import sys; sys.modules['torch'] = None\nfrom distinfer.cli import app\n"
              "app(['models', 'build-tiny'], prog_name='distinfer')")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "pip install 'distinfer[runtime]'" in " ".join(proc.stderr.split())
