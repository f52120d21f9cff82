"""The performance model: the pipeline schedule on hand-computed cases, calibration recovering known parameters
from synthetic measurements, predictions for the T4 configs from datasheets, and clear errors for bad hardware
files and calibration folders."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from distinfer.bundle import BUNDLE_SCHEMA, atomic_write_json
from distinfer.memory import ModelFacts
from distinfer.plan import RunSpec, run_id_for
from distinfer.predict.calibrate import CalibrationError, calibrate, load_calibration
from distinfer.predict.hardware import LINKS, load_hardware_file
from distinfer.predict.model import Efficiency, Machine, predict_run
from distinfer.predict.schedule import decode_cycle, first_tokens, prefill_finish
from distinfer.predict.workload import prompt_lengths
from distinfer.profiles import HARDWARE

REPO = Path(__file__).resolve().parent.parent
PROBE = {"cores": 2, "flops_1": {"float32": 50e9}, "flops_all": {"float32": 95e9},
         "read_1": [[2**20, 40e9], [2**30, 8e9]], "read_all": [[2**20, 80e9], [2**30, 12e9]], "launch_s": 4e-6,
         "wake_s": 40e-6, "measured": "synthetic"}
CONFIG = dict(model_type="llama", hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
              num_attention_heads=8, num_key_value_heads=8, vocab_size=8000, tie_word_embeddings=False)


def test_prefill_fills_and_drains_the_pipeline():
    assert prefill_finish([1.0, 1.0], [0.1, 0.0], 1) == pytest.approx([2.1])
    # micro-batch 1 enters stage 0 at 1.0 and reaches stage 1 at 2.1, when stage 1 has just finished micro-batch 0
    assert prefill_finish([1.0, 1.0], [0.1, 0.0], 2) == pytest.approx([2.1, 3.1])
    # a slow last stage: micro-batches queue in front of it
    assert prefill_finish([1.0, 3.0], [0.0, 0.0], 3) == pytest.approx([4.0, 7.0, 10.0])
    assert prefill_finish([2.0], [0.5], 2) == pytest.approx([2.5, 4.5])


def test_first_tokens_wait_for_every_prefill_and_the_decode_forwards_before_them():
    # one stage, two micro-batches: the stage prefills both (1 + 1), takes the first one's token at 2, runs its
    # decode forward (0.25), then takes the second one's token at 2.25
    assert first_tokens([1.0], [0.0], 2, 0.25) == pytest.approx([2.0, 2.25])
    # two stages: micro-batch 0 is back at 2.1, after stage 0 finished both prefills at 2.0; micro-batch 1 is back
    # at 3.1, later than stage 0's decode forward of micro-batch 0 (2.1 + 0.5)
    assert first_tokens([1.0, 1.0], [0.1, 0.0], 2, 0.5) == pytest.approx([2.1, 3.1])
    # a decode forward longer than the wait: micro-batch 1's token waits for it
    assert first_tokens([1.0, 1.0], [0.1, 0.0], 2, 1.5) == pytest.approx([2.1, 3.6])
    # one micro-batch: its prefill's trip
    assert first_tokens([1.0, 1.0], [0.1, 0.0], 1, 9.0) == pytest.approx([2.1])


def test_decode_cycle_keeps_at_most_min_m_p_stages_busy():
    # one micro-batch: one trip through both stages and both hops per token
    assert decode_cycle([1.0, 1.0], [0.1, 0.1], 1) == pytest.approx(2.2)
    # two micro-batches on two stages: still bound by the trip (each must come back before its next token)
    assert decode_cycle([1.0, 1.0], [0.1, 0.1], 2) == pytest.approx(2.2)
    # four micro-batches: every stage serves four per cycle
    assert decode_cycle([1.0, 1.0], [0.1, 0.1], 4) == pytest.approx(4.0)
    # four stages, two micro-batches: at most two of four busy, the cycle is the trip
    assert decode_cycle([1.0] * 4, [0.0] * 4, 2) == pytest.approx(4.0)
    # stages that share one core serve every micro-batch in turn
    assert decode_cycle([1.0, 1.0, 1.0], [0.0] * 3, 2, shared_s=[2.0, 1.0]) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="hops"):
        decode_cycle([1.0, 1.0], [0.1], 1)
    with pytest.raises(ValueError, match="at least 1"):
        prefill_finish([1.0], [0.0], 0)


def _model(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(CONFIG))
    return model


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "prompt": "word " * (20 + 7 * i)}) + "\n" for i in range(8)))
    return path


def _run(model: Path, prompts: Path, experiment: str, pp: int, batch: int, mb: int) -> RunSpec:
    return RunSpec(experiment=experiment, run_id=run_id_for("pipeline", pp, None, mb, batch, "float32"),
                   engine="pipeline", model_path=str(model), builtin=None, dtype="float32", trust_remote_code=False,
                   prompts=str(prompts), generation={"max_new_tokens": 16}, pp=pp, layers=None, microbatches=mb,
                   batch_size=batch, warmup=0, repeats=1, timeout_s=60)


def _write_bundle(outputs: Path, run: RunSpec, machine: Machine, truth: dict[str, Efficiency],
                  runtime: dict | None = None) -> None:
    p = predict_run(run, ModelFacts.from_config(CONFIG), machine, truth, prompt_lengths(run)[0])
    folder = outputs / run.experiment / run.run_id
    atomic_write_json(folder / "run.json", {"schema": BUNDLE_SCHEMA, "run": run.to_dict(), "runtime": runtime or {}})
    atomic_write_json(folder / "summary.json", {"status": "ok", "tpot_s": {"p50": p.tpot_s}, "ttft_s": {"mean": p.ttft_s},
                                                "output_tokens_per_s": p.output_tokens_per_s})


def test_calibration_recovers_known_parameters_from_synthetic_runs(tmp_path: Path):
    model, prompts = _model(tmp_path), _prompts(tmp_path)
    machine = Machine(HARDWARE["cpu"], LINKS["10gbe"], PROBE, local=True)
    truth = Efficiency(compute=0.6, memory=1.0, step_s=8e-4, batch_s=5e-3, cycle_s=3e-4, prefill=0.9)
    for batch in (1, 2, 4, 8):
        for mb in (1, 2) if batch > 1 else (1,):
            _write_bundle(tmp_path / "outputs", _run(model, prompts, "synthetic", 1, batch, mb), machine,
                          {"pipeline": truth})
    _write_bundle(tmp_path / "outputs", _run(model, prompts, "synthetic", 2, 4, 2), machine, {"pipeline": truth})
    data = calibrate([tmp_path / "outputs" / "synthetic"], machine)
    fitted = data["efficiency"]["pipeline"]
    for name, value in truth.to_dict().items():
        assert fitted[name] == pytest.approx(value, rel=0.05), name
    assert data["fit"]["pipeline"]["max_abs_error"] < 0.01
    assert data["fit"]["pipeline"]["trusted"] and data["fit"]["pipeline"]["warnings"] == []
    assert "pipeline-pp2-b4-mb2-fp32" not in data["fit"]["pipeline"]["runs"]  # only one-rank runs calibrate
    assert len(data["fit"]["pipeline"]["runs"]) == 7
    # and the held-out two-stage run is predicted from them
    two = _run(model, prompts, "synthetic", 2, 4, 2)
    eff = {"pipeline": Efficiency(**fitted)}
    held_out = predict_run(two, ModelFacts.from_config(CONFIG), machine, eff, prompt_lengths(two)[0])
    exact = predict_run(two, ModelFacts.from_config(CONFIG), machine, {"pipeline": truth}, prompt_lengths(two)[0])
    assert held_out.tpot_s == pytest.approx(exact.tpot_s, rel=0.02)


def test_a_fit_that_ends_on_a_bound_says_so_and_is_not_called_calibrated(tmp_path: Path):
    """Runs faster than the probe allows (compute five times the measured peak): the fit ends on its bound and
    misses its own runs; calibrate() marks it untrusted with the reasons, the analysis's prediction table carries
    them in `fit_warning`, and a prediction from the stored file says so in its source."""
    from distinfer.predict.study import efficiency_for, predicted_against_measured

    model, prompts = _model(tmp_path), _prompts(tmp_path)
    machine = Machine(HARDWARE["cpu"], LINKS["10gbe"], PROBE, local=True)
    impossible = Efficiency(compute=5.0, memory=1.0, step_s=1e-6, batch_s=1e-6, cycle_s=1e-6, prefill=5.0)
    runtime = {"device": "cpu", "hostnames": ["node"]}
    for batch in (1, 4, 16):
        _write_bundle(tmp_path / "outputs", _run(model, prompts, "fast", 1, batch, 1), machine,
                      {"pipeline": dataclasses.replace(impossible, memory=8.0)}, runtime)
    data = calibrate([tmp_path / "outputs" / "fast"], machine)
    fit = data["fit"]["pipeline"]
    assert fit["trusted"] is False
    assert any("compute at its upper bound" in w for w in fit["warnings"]), fit["warnings"]
    table = predicted_against_measured(tmp_path / "outputs" / "fast", lambda: PROBE)
    assert table["fit_warning"].str.startswith("fit not trusted: ").all(), table["fit_warning"].tolist()
    stored = tmp_path / "calibration.json"
    atomic_write_json(stored, data)
    assert "WARNING, fit not trusted" in efficiency_for(stored)[1]


def test_a_probe_taken_while_the_machine_is_busy_is_retaken_then_kept_with_a_warning(tmp_path: Path, monkeypatch):
    """Two processes spinning on the two cores while the CPU probe measures: it notices (other processes' CPU
    time), measures again up to three times, and keeps the figures marked disturbed with the reason; the
    prediction's assumptions then say so. (The hand-off probe, which starts processes of its own, is left out.)"""
    from distinfer.predict.study import assumptions
    from distinfer.probes import cpu

    monkeypatch.setattr(cpu, "_handoff_s", lambda: None)
    spinning = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        data = cpu.measure_cpu(tmp_path, fresh=True)
    finally:
        for proc in spinning:
            proc.kill()
            proc.wait()
    assert data["conditions"]["attempts"] == cpu.ATTEMPTS
    assert "other processes took" in data["disturbed"], data["disturbed"]
    assert cpu.read_probe(tmp_path)["disturbed"] == data["disturbed"], "kept with its warning"
    lines = assumptions(Machine(HARDWARE["cpu"], LINKS["10gbe"], data, local=True), "defaults", [])
    assert any(line.startswith("WARNING: the CPU probe was taken while the machine was busy") for line in lines)


def test_the_probe_finds_fault_with_all_cores_slower_than_one_and_with_noisy_repeats():
    from distinfer.probes.cpu import probe_problems

    figures = {"flops_1": {"float32": 100e9, "bfloat16": 490e9}, "flops_all": {"float32": 190e9, "bfloat16": 33e9}}
    quiet = {"other_processes_cores": 0.01, "spread": {"1": {"float32": 0.05}, "all": {"float32": 0.1}}}
    assert probe_problems(figures, quiet, 2) == ["bfloat16 on all 2 cores measured slower than on one"]
    assert probe_problems(figures, quiet, 1) == [], "one core: nothing to compare"
    noisy = {"other_processes_cores": 0.6, "spread": {"1": {"float32": 0.9}, "all": {}}}
    clean = {"flops_1": {"float32": 100e9}, "flops_all": {"float32": 190e9}}
    assert probe_problems(clean, noisy, 2) == ["other processes took 0.60 cores meanwhile",
                                               "the float32 repeats spread beyond 50%"]


def test_served_runs_are_predicted_with_the_fit_of_the_offline_experiment_analysed_beside_them(tmp_path: Path):
    """A serving study has no one-rank offline runs of its engine: the analysis fits the pipeline on those of an
    experiment analysed with it (same hardware), predicts the served runs from that fit, and says where the fit
    came from; alone, the served runs are predicted with the defaults and say so."""
    from distinfer.plan import expand
    from distinfer.predict.serving import predict_serving
    from distinfer.predict.study import predicted_against_measured
    from distinfer.spec import load_experiment

    model, prompts = _model(tmp_path), _prompts(tmp_path)
    probe = {**PROBE, "handoff_s": 3e-4}
    machine = Machine(HARDWARE["cpu"], LINKS["10gbe"], probe, local=True)
    truth = {"pipeline": Efficiency(compute=0.6, memory=1.0, step_s=8e-4, batch_s=5e-3, cycle_s=3e-4)}
    runtime = {"device": "cpu", "hostnames": ["node"]}
    for batch in (1, 2, 4, 8):
        for mb in (1, 2) if batch > 1 else (1,):
            _write_bundle(tmp_path / "outputs", _run(model, prompts, "offline", 1, batch, mb), machine, truth, runtime)
    config = tmp_path / "served.yaml"
    config.write_text(f"name: served\nmodel: {{builtin: tiny-llama}}\nprompts: {prompts}\nreference: none\n"
                      "generation: {max_new_tokens: 16}\nparallel: {engine: pipeline, pp: [1, 2]}\n"
                      "scenario: {kind: serving, rate: [2, inf], requests: 16}\n")
    served = [dataclasses.replace(r, model_path=str(model), builtin=None)  # the synthetic model's sizes
              for r in expand(load_experiment(config), config)]
    assert len(served) == 4 and all(r.serving for r in served)
    for run in served:
        p = predict_serving(run, ModelFacts.from_config(CONFIG), machine, truth, prompt_lengths(run)[0])
        folder = tmp_path / "outputs" / "served" / run.run_id
        atomic_write_json(folder / "run.json", {"schema": BUNDLE_SCHEMA, "run": run.to_dict(), "runtime": runtime})
        atomic_write_json(folder / "summary.json", {"status": "ok", "tpot_s": {"p50": p.tpot_s},
                                                    "ttft_s": {"mean": p.ttft_s},
                                                    "output_tokens_per_s": p.output_tokens_per_s})
    outputs = [tmp_path / "outputs" / "offline", tmp_path / "outputs" / "served"]
    table = predicted_against_measured(outputs[1], lambda: probe, outputs)
    assert set(table["run_id"]) == {r.run_id for r in served} and set(table["metric"]) == {"tpot", "ttft",
                                                                                           "tokens_per_s"}
    # the forwards fitted on the offline experiment, the server's own costs on the runs served by one rank
    server = "; server costs: this experiment's served runs of one rank"
    assert (table["calibration"] == "the one-rank runs of offline" + server).all()
    assert set(table[table["calibrated_on"]]["run_id"]) == {r.run_id for r in served if r.pp == 1}
    assert table["error"].abs().max() < 0.03, table
    alone = predicted_against_measured(outputs[1], lambda: probe)
    assert (alone["calibration"] == "the defaults" + server).all() and len(alone) == len(table)
    held_out = alone[~alone["calibrated_on"]]
    assert held_out["error"].abs().max() > 0.1, "the defaults are not the truth: the borrowed fit made the difference"


def test_calibration_needs_one_rank_runs(tmp_path: Path):
    model, prompts = _model(tmp_path), _prompts(tmp_path)
    machine = Machine(HARDWARE["cpu"], LINKS["10gbe"], PROBE, local=True)
    _write_bundle(tmp_path / "out", _run(model, prompts, "only-pp2", 2, 4, 2), machine, {})
    with pytest.raises(CalibrationError, match="no usable runs to calibrate on.*found 1 finished"):
        calibrate([tmp_path / "out" / "only-pp2"], machine)
    with pytest.raises(CalibrationError, match="not a calibration file"):
        load_calibration(prompts)


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distinfer", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_predict_t4_from_datasheets_without_calibration(tmp_path: Path):
    proc = _cli("predict", "configs/openllama3b-t4-strong.yaml", "--outputs", str(tmp_path / "outputs"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for run in ("pipeline-pp1-b8-mb2-fp16", "pipeline-pp2-b8-mb2-fp16", "pipeline-pp4-b8-mb2-fp16",
                "reference-b8-fp16"):
        assert run in out
    assert "uncalibrated" in out and "NVIDIA T4" in out and "10gbe between nodes" in out
    assert "best for most tokens/s:" in out
    assert not (tmp_path / "outputs").exists()  # predicting writes no bundles
    # a T4 decode step reads the 3B model's fp16 weights at a fraction of 320 GB/s: tens of milliseconds
    row = next(line for line in out.splitlines() if "reference-b8-fp16" in line)
    tpot_ms = float(row.split("│")[6])
    assert 20 < tpot_ms < 60


def test_bad_hardware_file_and_calibration_folder_exit_2(tmp_path: Path):
    bad = tmp_path / "gpu.yaml"
    bad.write_text("name: my-gpu\npeak_flops: {float16: 1.0e14}\n")
    with pytest.raises(ValueError, match=r"gpu.yaml: field 'memory_bandwidth': Field required"):
        load_hardware_file(bad)
    bad.write_text("name: my-gpu\npeak_flops: {float8: 1.0e14}\nmemory_bandwidth: 1.0e12\n")
    proc = _cli("predict", "configs/openllama3b-t4-strong.yaml", "--hardware", str(bad))
    assert proc.returncode == 2 and "field 'peak_flops.float8'" in proc.stderr and "Traceback" not in proc.stderr
    good = tmp_path / "good.yaml"
    good.write_text("name: l4\npeak_flops: {float16: 1.21e14, float32: 3.0e13}\nmemory_bandwidth: 3.0e11\n")
    proc = _cli("predict", "configs/openllama3b-t4-strong.yaml", "--hardware", str(good))
    assert proc.returncode == 0 and "l4: float16 121 TFLOP/s" in proc.stdout.replace("\n", " ")
    empty = tmp_path / "outputs" / "nothing"
    empty.mkdir(parents=True)
    proc = _cli("predict", "configs/openllama3b-t4-strong.yaml", "--calibrate", str(empty))
    assert proc.returncode == 2 and "no usable runs to calibrate on" in proc.stderr and "Traceback" not in proc.stderr


class _ConstantStages:
    """Stage costs for hand-computed schedules: a decode forward 1 s and a prefill 2 s on every stage, whatever
    the rows; no messages, no server costs; each stage on a device of its own."""

    def __init__(self, pp: int) -> None:
        self.pp, self.group = pp, 1
        self.eff = Efficiency(serve_step_s=0.0, serve_token_s=0.0, serve_request_s=0.0)
        self.ranks = [SimpleNamespace(cores=())] * pp

    def stage_times(self, rows: int, new: int, context: float) -> tuple[list[float], list[float]]:
        return [1.0 if new == 1 else 2.0] * self.pp, []

    def hop_times(self, rows: int, new: int) -> list[float]:
        return [0.0] * self.pp


def test_serving_simulation_on_hand_computed_schedules():
    from distinfer.predict.serving import _Request, simulate

    # one stage: r0 prefills alone (0-2); r1, sent at 0.5, joins the next step, which decodes r0 and prefills r1
    # (2-5); then both decode (5-6), r0 is done, r1 decodes alone (6-7)
    requests = [_Request(prompt=10, tokens=3, arrival=0.0), _Request(prompt=10, tokens=3, arrival=0.5)]
    busy = simulate(_ConstantStages(1), requests, groups=1, max_batch=8)
    assert [r.times for r in requests] == [[2.0, 5.0, 6.0], [5.0, 6.0, 7.0]]
    assert busy == [7.0]
    # two stages, two groups, both sent at 0: each group takes one request (the requests spread evenly);
    # group 0's prefill leaves stage 0 at 2 and stage 1 at 4, group 1's follows it through both stages (2-4, 4-6);
    # group 0 decodes on stage 0 at 4-5 and waits for stage 1 until 6 (back at 7), group 1 decodes at 6-7 and 7-8
    requests = [_Request(prompt=10, tokens=2, arrival=0.0), _Request(prompt=10, tokens=2, arrival=0.0)]
    busy = simulate(_ConstantStages(2), requests, groups=2, max_batch=8)
    assert [r.times for r in requests] == [[4.0, 7.0], [6.0, 8.0]]
    assert busy == [6.0, 6.0]
    # closed loop, one user: the second request is sent when the first ended
    requests = [_Request(prompt=10, tokens=2), _Request(prompt=10, tokens=2)]
    simulate(_ConstantStages(1), requests, groups=1, max_batch=8, users=1)
    assert [(r.arrival, r.times) for r in requests] == [(0.0, [2.0, 3.0]), (3.0, [5.0, 6.0])]


def test_serving_follows_the_load_up_to_saturation(tmp_path: Path):
    from distinfer.predict.serving import predict_serving
    from distinfer.serving.schedule import arrival_offsets

    model, prompts = _model(tmp_path), _prompts(tmp_path)
    machine = Machine(HARDWARE["cpu"], LINKS["10gbe"], PROBE, local=True)
    eff = {"pipeline": Efficiency(compute=0.5, memory=1.0, step_s=5e-4, batch_s=1e-3, cycle_s=1e-4)}
    base = _run(model, prompts, "serve", 2, 1, 2)

    def served(kind: str, value: object) -> object:
        scenario = {"kind": "serving", "load": kind, "value": value, "max_batch": 8, "requests": 32}
        run = dataclasses.replace(base, run_id=f"{kind}-{value}", scenario=scenario)
        return predict_serving(run, ModelFacts.from_config(CONFIG), machine, eff, prompt_lengths(run)[0])

    saturated = served("rate", "inf")
    slow = served("rate", 0.5)
    # below capacity the server keeps up: the run lasts from the first send to the last answer, a few tenths of a
    # second after the seeded schedule's last send
    last_send = arrival_offsets(32, 0.5, 1.0, 0)[-1]
    assert last_send < slow.wall_s < last_send + 1.0
    assert slow.output_tokens_per_s == pytest.approx(32 * 16 / slow.wall_s)
    assert saturated.output_tokens_per_s > 3 * slow.output_tokens_per_s
    # ten and twenty times what it can carry: saturated, tokens/s stop following the load (within the waves in
    # which requests join and leave: sent all at once they join together)
    for factor in (10, 20):
        beyond = served("rate", factor * saturated.output_tokens_per_s / 16).output_tokens_per_s
        assert 0.9 * saturated.output_tokens_per_s < beyond < 1.3 * saturated.output_tokens_per_s, factor
    assert served("rate", 2.0).tpot_s >= slow.tpot_s  # more requests running, longer steps
    # rate inf: 32 requests in waves of max_batch 8 queue, so the mean TTFT is several waves long
    assert saturated.ttft_s > 1.5 * saturated.tpot_s * 16
    one_user, eight = served("concurrency", 1), served("concurrency", 8)
    assert one_user.output_tokens_per_s < eight.output_tokens_per_s <= 8 * one_user.output_tokens_per_s


def test_the_cpu_probe_without_torch_says_what_to_install(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    from distinfer.probes.cpu import measure_cpu

    monkeypatch.setitem(sys.modules, "torch", None)  # a base install (a login node): no PyTorch
    with pytest.raises(ValueError, match=r"distinfer\[runtime\].*--hardware"):
        measure_cpu(tmp_path, fresh=True)
    assert not list(tmp_path.iterdir())
