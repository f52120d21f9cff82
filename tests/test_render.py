"""Job scripts: golden files for the shipped T4 configs, shellcheck, Apptainer wrapping, and no injection.

Golden files: tests/golden/<experiment>/<run_id>.sbatch. If a change to the scripts is intended, run
`DISTINFER_UPDATE_GOLDEN=1 make test` (or delete the files) and review the diff.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distinfer.plan import expand
from distinfer.slurm import RenderError, render_sbatch
from distinfer.spec import load_experiment

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden"
T4_CONFIGS = sorted((REPO / "configs").glob("openllama3b-t4-*.yaml"))
SCRATCH = Path("/scratch/outputs")  # a fixed outputs root, so the scripts do not depend on this checkout


def shellcheck(script: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True, timeout=60)


def rendered_t4_scripts() -> list[tuple[str, str]]:
    scripts = []
    for config in T4_CONFIGS:
        exp = load_experiment(config, require_model=False)
        for run in expand(exp, config):
            scripts.append((f"{exp.name}/{run.run_id}.sbatch",
                            render_sbatch(run, exp.cluster, exp.container, SCRATCH / exp.name / run.run_id)))
    return scripts


def test_t4_scripts_match_their_golden_files() -> None:
    scripts = rendered_t4_scripts()
    assert len(scripts) >= 8
    for name, text in scripts:
        golden = GOLDEN / name
        if os.environ.get("DISTINFER_UPDATE_GOLDEN"):
            golden.parent.mkdir(parents=True, exist_ok=True)
            golden.write_text(text)
        assert golden.exists(), f"{name} has no golden file (DISTINFER_UPDATE_GOLDEN=1 writes it)"
        assert text == golden.read_text(), f"{name} differs from its golden file"


def test_t4_scripts_pass_shellcheck_and_wrap_the_worker_in_apptainer(tmp_path: Path) -> None:
    for name, text in rendered_t4_scripts():
        script = tmp_path / name.replace("/", "_")
        script.write_text(text)
        result = shellcheck(script)
        assert result.returncode == 0, f"{name}:\n{result.stdout}"
        # A job asks for the GPUs its ranks use on a node: 1, or 2 for the hybrid study's multi-rank runs.
        hybrid = name.startswith("openllama3b-t4-hybrid/") and ("tp2" in name or "pp2" in name)
        assert f"#SBATCH --gpus-per-node={2 if hybrid else 1}" in text and "#SBATCH --partition=gpu" in text
        image = "distinfer-vllm.sif" if "/vllm-" in name else "distinfer.sif"  # vLLM's jobs: its own image
        assert f"LAUNCH=(apptainer exec --nv --bind /shared/models --bind /scratch /shared/containers/{image})" in text
        assert "module load cuda/12.1" in text
    scripts = dict(rendered_t4_scripts())
    pp2 = scripts["openllama3b-t4-fp16/pipeline-pp2-b8-mb1-fp16.sbatch"]
    assert "#SBATCH --nodes=2" in pp2 and "--nproc-per-node=1" in pp2
    hybrid = scripts["openllama3b-t4-hybrid/pipeline-pp2-tp2-b8-mb2-fp16.sbatch"]  # a tp group per node
    assert "#SBATCH --nodes=2" in hybrid and "--nproc-per-node=2" in hybrid
    vllm = scripts["openllama3b-t4-vllm/vllm-pp2-fp16-rate4.sbatch"]  # vLLM's --nnodes launch, a server per node
    assert "#SBATCH --nodes=2" in vllm and "-m distinfer.serving.vllm" in vllm and "--node-rank" in vllm


def test_apptainer_gets_the_exact_command_line(tmp_path: Path) -> None:
    """Apptainer cannot be installed here: a stand-in `apptainer` on PATH records its arguments only."""
    config = REPO / "configs" / "openllama3b-t4-fp16.yaml"
    exp = load_experiment(config, require_model=False)
    run = next(r for r in expand(exp, config) if r.run_id == "pipeline-pp2-b8-mb1-fp16")
    run_dir = tmp_path / "run"
    text = render_sbatch(run, exp.cluster, exp.container, run_dir)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = {"apptainer": 'printf "%s\\n" "$@" --- >> "$STUB_LOG"',
            "srun": 'shift 3; exec "$@"',  # drop srun's own options, run the task once
            "scontrol": "echo node1", "module": "true"}
    for name, body in stub.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "STUB_LOG": str(tmp_path / "calls"),
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[1-2]"}
    run_dir.mkdir()
    subprocess.run(["bash", str(script)], env=env, check=True, timeout=60)
    calls = (tmp_path / "calls").read_text().split("---\n")
    prefix = ["exec", "--nv", "--bind", "/shared/models", "--bind", "/scratch", "/shared/containers/distinfer.sif"]
    assert calls[0].splitlines() == prefix + [
        "python3", "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
        "--rdzv-endpoint=node1:20154", "--rdzv-id=77", "-m", "distinfer.runtime", str(run_dir)]
    assert calls[1].splitlines() == prefix + ["python3", "-m", "distinfer.finalize", str(run_dir), "0"]


def test_outputs_path_unsafe_for_sbatch_lines_is_rejected(tmp_path: Path) -> None:
    config = REPO / "configs" / "openllama3b-t4-fp16.yaml"
    exp = load_experiment(config, require_model=False)
    run = expand(exp, config)[0]
    with pytest.raises(RenderError, match="cannot go in #SBATCH lines"):
        render_sbatch(run, exp.cluster, exp.container, tmp_path / "my outputs" / "run")


AWKWARD = "a b 'single' \"double\" $(touch INJECTED_1) `touch INJECTED_2`; touch INJECTED_3 \\ $HOME"


@pytest.mark.slow  # submits to the local Slurm cluster
def test_awkward_values_arrive_unchanged_and_inject_nothing(slurm, tmp_path: Path, tiny_models) -> None:  # noqa: ANN001
    """Against real sbatch: env values and paths with spaces, quotes, $(...), backticks and ; reach the job as is.

    The worker is replaced by a small script (at a path with spaces and quotes) that records what it received.
    """
    worker_dir = tmp_path / "it's a dir"
    worker_dir.mkdir()
    worker = worker_dir / "record env.sh"
    worker.write_text('#!/bin/bash\nprintf "%s" "$PAYLOAD" > "${@: -1}/payload.txt"\nprintf "%s\\n" "$@" > "${@: -1}/args.txt"\n')
    worker.chmod(0o755)
    prompts_dir = tmp_path / "prompts $(touch INJECTED_4)"
    prompts_dir.mkdir()
    shutil.copy(REPO / "prompts" / "correctness.jsonl", prompts_dir / "p.jsonl")
    config = tmp_path / "e.yaml"
    config.write_text(json.dumps({  # JSON is YAML: exact strings without YAML quoting rules
        "name": "awkward", "model": {"builtin": "tiny-llama"}, "prompts": str(prompts_dir / "p.jsonl"),
        "cluster": {"profile": "cpu", "time": "5", "python": str(worker), "env": {"PAYLOAD": AWKWARD}},
    }))
    proc = subprocess.run([sys.executable, "-m", "distinfer", "submit", str(config)], cwd=tmp_path, env=slurm,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "outputs" / "awkward" / "pipeline-pp1-b1-mb1-fp32"
    script = run_dir / "job.sbatch"
    assert shellcheck(script).returncode == 0, shellcheck(script).stdout
    for _ in range(600):
        if (run_dir / "args.txt").exists():
            break
        subprocess.run(["sleep", "0.1"])
    assert (run_dir / "payload.txt").read_text() == AWKWARD
    run_json = json.loads((run_dir / "run.json").read_text())
    assert run_json["run"]["prompts"] == str(prompts_dir / "p.jsonl")
    injected = [p for p in tmp_path.rglob("INJECTED_*")] + list(Path.home().glob("INJECTED_*"))
    assert not injected, f"an injected command ran: {injected}"


def test_nsys_profile_wraps_each_nodes_ranks(tmp_path: Path) -> None:
    """`profile: nsys` (GPU clusters; nsys is not installed here): torchrun and its ranks run under nsys."""
    text = (REPO / "configs" / "openllama3b-t4-fp16.yaml").read_text()
    text = text.replace("../prompts/", f"{REPO}/prompts/").replace("config: models/", f"config: {REPO}/configs/models/")
    config = tmp_path / "nsys.yaml"
    config.write_text(text.replace("benchmark: {warmup: 1, repeats: 3}", "benchmark: {warmup: 1, repeats: 3, profile: nsys}"))
    exp = load_experiment(config, require_model=False)
    run = next(r for r in expand(exp, config) if r.pp == 2)
    script = render_sbatch(run, exp.cluster, exp.container, SCRATCH / "nsys" / run.run_id)
    assert ("PROFILER=(nsys profile '--trace=cuda,nvtx,osrt' --force-overwrite=true "
            f"--output={SCRATCH}/nsys/{run.run_id}/nsys-%h-%p)") in script
    assert '"${LAUNCH[@]}" "${PROFILER[@]}" "$PYTHON" -m torch.distributed.run' in script
    (tmp_path / "job.sbatch").write_text(script)
    assert shellcheck(tmp_path / "job.sbatch").returncode == 0


@pytest.mark.parametrize("placement, job_nodes, first", [("beside", 2, 0), ("apart", 4, 2)])
def test_client_nodes_get_the_load_step_and_the_server_keeps_its_nodes(tmp_path: Path, placement: str,
                                                                        job_nodes: int, first: int) -> None:
    """`scenario.client.nodes: 2`: pp 2 (one T4 per node) serves from nodes 0-1; the load runs on 2 nodes,
    the same ones (beside) or 2 more (apart); distinfer's and vLLM's scripts alike, shellcheck clean."""
    text = (REPO / "configs" / "openllama3b-t4-vllm.yaml").read_text()
    text = text.replace("../prompts/", f"{REPO}/prompts/").replace("config: models/", f"config: {REPO}/configs/models/")
    config = tmp_path / "clients.yaml"
    config.write_text(text.replace("  max_batch: 16\n", f"  max_batch: 16\n  client: {{nodes: 2, placement: {placement}}}\n"))
    exp = load_experiment(config, require_model=False)
    runs = [r for r in expand(exp, config) if r.pp == 2 and r.scenario.value == 4]
    assert {r.engine for r in runs} == {"pipeline", "vllm"}
    for run in runs:
        script = render_sbatch(run, exp.cluster, exp.container, SCRATCH / "clients" / run.run_id)
        assert f"#SBATCH --nodes={job_nodes}\n" in script
        assert (f"srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --relative={first} \\\n"
                '  --overlap --kill-on-bad-exit=0 \\\n  "${LAUNCH[@]}" "$PYTHON" -m distinfer.serving "$RUN_DIR"') in script
        server = ("srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --relative=0 --kill-on-bad-exit=1" if run.engine == "pipeline"
                  else "for ((node = 0; node < 2; node++)); do")
        assert server in script
        (tmp_path / f"{run.engine}.sbatch").write_text(script)
        assert shellcheck(tmp_path / f"{run.engine}.sbatch").returncode == 0, run.engine
