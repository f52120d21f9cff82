"""Pure functions: layer split, metric math, Slurm/torchrun mapping, sampling filters, bundle writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distinfer.bundle import JsonlWriter, RunBundle, atomic_write_json, read_json
from distinfer.layout import split_layers
from distinfer.metrics import LatencyReport, RequestTiming, distribution, percentile
from distinfer.models.loading import load_full_model
from distinfer.provenance import allowed_env
from distinfer.runtime.cpu.kernels import FEW_ROWS_KERNELS, CpuLinear
from distinfer.runtime.cpu.threads import OPENMP_BINDING_VARS, rank_cores
from distinfer.runtime.pipeline import prefill_positions, truncate_at_eos
from distinfer.runtime.ranks import DistEnv, dist_env_from, first_host
from distinfer.runtime.sampling import Sampler, SamplingParams, filter_logits


def test_balanced_split_gives_the_remainder_to_early_stages() -> None:
    assert [(s.start, s.stop) for s in split_layers(8, 3)] == [(0, 3), (3, 6), (6, 8)]
    assert [(s.start, s.stop) for s in split_layers(26, 4)] == [(0, 7), (7, 14), (14, 20), (20, 26)]
    layouts = split_layers(8, 3, [1, 5, 2])
    assert [(s.start, s.stop, s.is_first, s.is_last) for s in layouts] == [
        (0, 1, True, False), (1, 6, False, False), (6, 8, False, True)]
    with pytest.raises(ValueError):
        split_layers(8, 2, [3, 4])
    with pytest.raises(ValueError):
        split_layers(4, 5)


def test_percentiles_match_numpy_linear_interpolation() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 90) == pytest.approx(7.6)
    assert percentile(values, 99) == pytest.approx(9.76)
    assert distribution([2.0]) == {"mean": 2.0, "p50": 2.0, "p90": 2.0, "p99": 2.0}
    assert distribution([])["p50"] is None


def test_request_metrics_follow_the_definitions() -> None:
    r = RequestTiming((0.5, 0.6, 0.8, 1.1))
    assert r.ttft == 0.5 and r.e2e == 1.1
    assert r.tpot == pytest.approx((1.1 - 0.5) / 3)
    assert r.itl == pytest.approx([0.1, 0.2, 0.3])
    assert RequestTiming((0.4,)).tpot is None


def test_throughput_is_tokens_over_measured_wall_time() -> None:
    report = LatencyReport()
    report.add_batch([[0.1, 0.2], [0.1, 0.2, 0.3]], wall_s=0.5)
    report.add_batch([[0.2]], wall_s=0.5)
    s = report.summary()
    assert s["output_tokens"] == 6 and s["output_tokens_per_s"] == pytest.approx(6.0)
    assert s["prompts_per_s"] == pytest.approx(3.0)
    assert s["ttft_s"]["mean"] == pytest.approx((0.1 + 0.1 + 0.2) / 3)
    assert s["itl_s"]["p50"] == pytest.approx(0.1)


def test_slurm_variables_map_to_torch_ones() -> None:
    env = dist_env_from({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NNODES": "2",
                         "SLURM_JOB_NODELIST": "gpu[07-08]"})
    assert env == DistEnv(rank=3, world_size=4, local_rank=1, local_world_size=2, master_addr="gpu07")
    torchrun = dist_env_from({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                              "MASTER_ADDR": "n1", "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert torchrun == DistEnv(1, 2, 1, 2, "n1", 1234), "torchrun's variables win over Slurm's"
    assert dist_env_from({}) == DistEnv()
    assert first_host("n1") == "n1" and first_host("gpu[03-05,9],login1") == "gpu03"
    assert first_host("node[9,10]") == "node9"


def test_openmp_spin_count_is_shorter_only_for_ranks_sharing_a_node() -> None:
    from distinfer.runtime.cpu.openmp import SHARED_NODE_SPINCOUNT, rank_spin_count

    assert rank_spin_count({}) is None, "one process: OpenMP's default"
    two_local = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    assert rank_spin_count(two_local) == SHARED_NODE_SPINCOUNT
    assert rank_spin_count({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"}) is None, "one rank per node"
    slurm = {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_NNODES": "2"}
    assert rank_spin_count(slurm) == SHARED_NODE_SPINCOUNT, "two tasks on each of two nodes"
    assert rank_spin_count({**two_local, "GOMP_SPINCOUNT": "7"}) == "7", "the user's value wins"


def test_rank_cores_split_or_rotate() -> None:
    cores = [0, 1, 2, 3]
    assert [rank_cores(r, r, 2, True, cores) for r in range(2)] == [[0, 1], [2, 3]], "computing together: a share each"
    assert [rank_cores(r, r, 4, True, [0, 1]) for r in range(4)] == [[0], [1], [0], [1]], "more ranks than cores"
    assert rank_cores(0, 0, 2, False, cores) == [0, 1, 2, 3], "taking turns: every core"
    assert rank_cores(1, 1, 2, False, cores) == [1, 2, 3, 0], "each stage's main thread on a core of its own"
    # Two Slurm nodes on one machine (the test cluster): both ranks are local rank 0 of one, yet their main
    # threads still get different cores.
    assert [rank_cores(r, 0, 1, False, [0, 1])[0] for r in range(2)] == [0, 1], "rotated by the global rank"


PIN_PROBE = """
import json, os, torch
from distinfer.runtime.cpu.threads import pin_threads, available_cores
cores = available_cores()[:2]
torch.set_num_threads(2)  # starts a helper thread of its own; the workers are the threads that come after
before = set(os.listdir("/proc/self/task"))
pinned = pin_threads(cores)
workers = set(os.listdir("/proc/self/task")) - before
print(json.dumps({"cores": cores, "pinned": pinned, "threads": torch.get_num_threads(),
                  "main": sorted(os.sched_getaffinity(0)),
                  "workers": sorted({c for t in workers for c in os.sched_getaffinity(int(t))})}))
"""


def test_pin_threads_puts_main_and_openmp_workers_on_their_cores() -> None:
    # A fresh interpreter: pinning changes the calling process, and OpenMP's workers must not exist yet.
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_BINDING_VARS}
    probe = json.loads(subprocess.run([sys.executable, "-c", PIN_PROBE], capture_output=True, text=True, env=env,
                                      check=True).stdout)
    assert len(probe["cores"]) == 2, "this test needs a machine with two cores or more"
    first, second = probe["cores"]
    assert probe["pinned"] and probe["threads"] == 2
    assert probe["main"] == [first] and probe["workers"] == [second], probe
    user = json.loads(subprocess.run([sys.executable, "-c", PIN_PROBE], capture_output=True, text=True,
                                     env={**env, "OMP_PROC_BIND": "close"}, check=True).stdout)
    assert not user["pinned"], "the user's own OpenMP binding is left alone"


def test_environment_capture_is_an_allow_list() -> None:
    env = {"SLURM_JOB_ID": "42", "NCCL_DEBUG": "INFO", "OMP_NUM_THREADS": "2", "HF_TOKEN": "hf_secret",
           "NCCL_SECRET_KEY": "x", "AWS_SECRET_ACCESS_KEY": "y", "HOME": "/root", "SLURM_JOB_PASSWORD": "z",
           "GOMP_SPINCOUNT": "20000"}
    assert allowed_env(env) == {"GOMP_SPINCOUNT": "20000", "NCCL_DEBUG": "INFO", "OMP_NUM_THREADS": "2",
                                "SLURM_JOB_ID": "42"}


def test_left_padding_positions_match_generate() -> None:
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert prefill_positions(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    assert truncate_at_eos([5, 2, 7], [0.1, 0.2, 0.3], (2,)) == ([5, 2], [0.1, 0.2])
    assert truncate_at_eos([5, 6], [0.1, 0.2], (2,)) == ([5, 6], [0.1, 0.2])


def test_top_k_and_top_p_keep_the_expected_tokens() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: torch.isfinite(filter_logits(logits, SamplingParams(greedy=False, **kw)))[0].tolist()  # noqa: E731
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.7) == [True, True, False, False]
    assert kept(top_p=0.81) == [True, True, True, False]
    assert kept(top_p=0.1) == [True, False, False, False]


def test_sampling_depends_on_prompt_index_not_on_batch_position() -> None:
    params = SamplingParams(greedy=False, temperature=1.0, seed=3)
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    together = Sampler(params)(logits, [10, 11, 12]).tolist()
    one_by_one = [Sampler(params)(logits[i : i + 1], [10 + i]).item() for i in range(3)]
    assert together == one_by_one
    assert Sampler(SamplingParams())(logits, [0, 1, 2]).tolist() == logits.argmax(-1).tolist()


def test_atomic_json_and_jsonl(tmp_path: Path) -> None:
    bundle = RunBundle(tmp_path / "run")
    atomic_write_json(bundle.summary_json, {"status": "ok"})
    assert bundle.is_done() and [p.name for p in bundle.root.iterdir()] == ["summary.json"]
    bundle.summary_json.write_text('{"status": "o')  # what a torn write would look like
    assert read_json(bundle.summary_json) is None and not bundle.is_done()
    writer = JsonlWriter(bundle.completions)
    writer.write({"id": "a"})
    assert json.loads(bundle.completions.read_text()) == {"id": "a"}  # flushed before close
    writer.close()


def test_a_stop_signal_after_the_time_limit_is_a_timeout() -> None:
    from datetime import datetime

    from distinfer.finalize import stop_status

    end = datetime(2026, 1, 1, 12, 0, 0)
    at = end.timestamp()
    assert stop_status({"DISTINFER_JOB_END": end.isoformat()}, at + 30) == "timeout"
    assert stop_status({"DISTINFER_JOB_END": end.isoformat()}, at - 600) == "cancelled"  # scancel before the limit
    assert stop_status({"DISTINFER_JOB_END": "Unknown"}, at) == "cancelled"
    assert stop_status({}, at) == "cancelled"  # Ctrl-C on a local run


def test_finalize_names_the_rank_that_failed_when_rank_0_was_only_stopped(tmp_path: Path) -> None:
    """Rank 1 fails; torchrun then stops rank 0, whose summary says cancelled: the run failed, because of rank 1."""
    from distinfer.finalize import finalize_run

    bundle = RunBundle(tmp_path)
    atomic_write_json(bundle.run_json, {"run": {"pp": 2, "tp": 1, "run_id": "r"}})
    atomic_write_json(bundle.summary_json, {"status": "cancelled", "error": "rank 0: stopped by SIGTERM"})
    atomic_write_json(bundle.rank_metrics(0), {"rank": 0, "status": "cancelled", "error": "rank 0: stopped by SIGTERM"})
    atomic_write_json(bundle.rank_metrics(1), {"rank": 1, "status": "failed", "error": "rank 1: out of memory in x"})
    summary = finalize_run(tmp_path, 1)
    assert summary is not None and summary["status"] == "failed" and summary["failed_ranks"] == [1]
    assert summary["error"].startswith("rank 1: out of memory") and summary["dead_ranks"] == []
    assert read_json(bundle.summary_json) == summary
    # An ok run stays ok when only the launcher's teardown failed; the exit code is kept.
    atomic_write_json(bundle.summary_json, {"status": "ok"})
    assert finalize_run(tmp_path, 1) == {"status": "ok", "launcher_exit_code": 1}


def test_a_new_attempt_archives_the_last_one(tmp_path: Path) -> None:
    bundle = RunBundle(tmp_path)
    atomic_write_json(bundle.run_json, {"run": {}})
    atomic_write_json(bundle.summary_json, {"status": "failed"})
    bundle.rank_log(0).write_text("first attempt\n")
    assert bundle.archive_attempt() == tmp_path / "attempts" / "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attempts", "run.json"]
    bundle.rank_log(0).write_text("second attempt\n")
    assert bundle.archive_attempt() == tmp_path / "attempts" / "2"
    assert (tmp_path / "attempts" / "1" / "rank_0.log").read_text() == "first attempt\n"
    assert bundle.archive_attempt() is None


def test_long_context_prompts_are_deterministic_and_cut_to_the_context(tiny_models) -> None:  # noqa: ANN001
    from distinfer.models.loading import load_tokenizer
    from distinfer.prompts import build_prompt_set, take_prompts
    from distinfer.runtime.worker import make_batches

    texts = Path(__file__).resolve().parent.parent / "prompts" / "texts" / "passages.txt"
    prompts = build_prompt_set(texts, 1024, 3, "Question: what is it about? Answer:")
    assert prompts == build_prompt_set(texts, 1024, 3, "Question: what is it about? Answer:")
    assert len({p.prompt for p in prompts}) == 3 and all(p.prompt.endswith("Answer:") for p in prompts)
    tokenizer = load_tokenizer(tiny_models["tiny-llama"])
    batch = make_batches(prompts, tokenizer, 3, max_prompt_tokens=1024)[0]
    assert batch.input_ids.shape == (3, 1024) and bool(batch.attention_mask.all()), "every prompt exactly 1024"
    assert tokenizer.decode(batch.input_ids[0][-8:]).endswith("Answer:"), "cut from the left: the question stays"
    assert [p.id for p in take_prompts(prompts, 5)] == ["ctx1024-0", "ctx1024-1", "ctx1024-2", "ctx1024-0#2",
                                                        "ctx1024-1#2"]


@pytest.mark.parametrize("rows", [1, 3, 8, 40])
@pytest.mark.parametrize("splits", [1, 2, 4])
@pytest.mark.parametrize("kernel", ["split", "onednn", "mkl", "cpp"])
def test_cpu_linear_computes_what_nn_linear_computes(rows: int, splits: int, kernel: str) -> None:
    from distinfer.runtime.cpu.cpp_ops import decode_ops

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    few_rows = kernel if kernel in FEW_ROWS_KERNELS else "onednn"
    fast = CpuLinear(linear.weight, linear.bias, splits, kernel, few_rows, decode_ops() if kernel == "cpp" else None)
    x = torch.randn(1, rows, 64)  # one sequence of `rows` tokens
    with torch.inference_mode():
        assert torch.allclose(fast(x), linear(x), rtol=1e-5, atol=1e-5)
    assert fast.weight is linear.weight  # no copy of the weights
    assert fast.splits == splits


@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, 24, 31])
@pytest.mark.parametrize("shape", [(96, 64), (37, 100), (5, 16), (3, 7)])  # [out, in]: ragged rows and lanes too
def test_linear_rows_computes_what_f_linear_computes(rows: int, shape: tuple[int, int]) -> None:
    from distinfer.runtime.cpu.cpp_ops import decode_ops

    ops = decode_ops()
    assert ops is not None, "the C++ ops did not build (is g++ installed? see the log)"
    torch.manual_seed(rows)
    x, w, b = torch.randn(rows, shape[1]), torch.randn(*shape), torch.randn(shape[0])
    expected = torch.nn.functional.linear(x.double(), w.double(), b.double()).float()
    assert torch.allclose(ops.linear_rows(x, w, b), expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(ops.linear_rows(x, w), expected - b, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="x has 4 features, w takes"):
        ops.linear_rows(torch.randn(rows, 4), w)
    with pytest.raises(RuntimeError, match="w must be a contiguous fp32 CPU tensor"):
        ops.linear_rows(x, w.t().contiguous().t())


def test_the_fastest_kernels_are_timed_and_set_on_every_layer() -> None:
    from distinfer.runtime.cpu.cpp_ops import decode_ops
    from distinfer.runtime.cpu.kernels import ONE_ROW_KERNELS, choose_kernels, use_fast_cpu_linears

    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(256, 512) for _ in range(4)))
    assert choose_kernels(model) is None, "no CpuLinear layers yet"
    use_fast_cpu_linears(model, splits=2)
    x = torch.randn(8, 256)
    with torch.inference_mode():
        expected = x @ model[0].weight.t() + model[0].bias
        picked = choose_kernels(model, decode_ops(), budget_bytes=2 * 512 * 256 * 4)  # times the first two layers
    assert set(picked["one_row"]["read_bytes_per_s"]) == set(ONE_ROW_KERNELS)
    assert set(picked["few_rows"]["read_bytes_per_s"]) == set(FEW_ROWS_KERNELS)
    for kind, choice in picked.items():
        rates = choice["read_bytes_per_s"]
        assert all(rates.values()) and choice["kernel"] == max(rates, key=rates.get)
        assert {getattr(m, kind) for m in model} == {choice["kernel"]}, "every layer, timed or not, uses the choice"
    with torch.inference_mode():
        assert torch.allclose(model[0](x[:1]), expected[:1], rtol=1e-5, atol=1e-5)
        assert torch.allclose(model[0](x), expected, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # within a margin of the fastest, linear_rows is taken (a Llama's one-call step)
        favoured = choose_kernels(model, decode_ops(), budget_bytes=2 * 512 * 256 * 4, passes=1, cpp_margin=1e6)
    assert {kind: choice["kernel"] for kind, choice in favoured.items()} == {"one_row": "cpp", "few_rows": "cpp"}
    single = torch.nn.Sequential(torch.nn.Linear(64, 64))
    use_fast_cpu_linears(single, splits=1)
    without_cpp = choose_kernels(single)
    assert set(without_cpp["one_row"]["read_bytes_per_s"]) == {"onednn", "mkl"}, "no split on one thread, no C++"
    assert without_cpp["few_rows"]["kernel"] == "onednn"


def test_cpu_linear_falls_back_when_rows_do_not_split_evenly() -> None:
    linear = torch.nn.Linear(16, 10, bias=False)
    fast = CpuLinear(linear.weight, None, 4)  # 10 outputs do not split in 4
    assert fast.splits == 1
    x = torch.randn(1, 1, 16)
    with torch.inference_mode():
        assert torch.allclose(fast(x), linear(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, per_layer", [("tiny-llama", 7), ("tiny-gpt2", 4)])
def test_fast_linears_replace_every_projection_and_keep_the_logits(tiny_models, name: str, per_layer: int) -> None:  # noqa: ANN001,E501
    from distinfer.models.loading import count_parameters, load_full_model
    from distinfer.runtime.cpu.kernels import use_fast_cpu_linears

    stock = load_full_model(tiny_models[name], "float32", torch.device("cpu"))
    fast = load_full_model(tiny_models[name], "float32", torch.device("cpu"))
    layers = stock.config.num_hidden_layers
    assert use_fast_cpu_linears(fast, splits=2) == layers * per_layer + 1  # + the head (GPT-2: Conv1D too)
    assert not [m for m in fast.modules() if type(m).__name__ in ("Linear", "Conv1D")]
    assert count_parameters(fast) == count_parameters(stock)
    ids = torch.tensor([[5, 9, 17, 33, 2, 40, 41]])
    with torch.inference_mode():
        assert torch.allclose(fast(ids).logits, stock(ids).logits, rtol=1e-4, atol=1e-4)
        assert torch.allclose(fast(ids[:, :1]).logits, stock(ids[:, :1]).logits, rtol=1e-4, atol=1e-4)
    half = load_full_model(tiny_models[name], "bfloat16", torch.device("cpu"))
    assert use_fast_cpu_linears(half) == 0  # only fp32 layers change


def test_fast_linears_leave_quantized_layers_alone() -> None:
    from distinfer.models.quantize import quantize_int8_weights
    from distinfer.runtime.cpu.kernels import use_fast_cpu_linears

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    model = quantize_int8_weights(model) or model
    assert use_fast_cpu_linears(model) == 0
    assert [type(m) for m in model] == [torch.nn.Linear, torch.nn.Linear]


def _anon_huge_kib(start: int, end: int) -> int:
    """AnonHugePages of this process's mappings that overlap [start, end)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(x, 16) for x in head.split("-"))
            inside = low < end and high > start
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1])
    return total


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_huge_page_weights_keep_values_ties_and_logits(tiny_models, name: str) -> None:  # noqa: ANN001
    from distinfer.models.loading import count_parameters, load_full_model
    from distinfer.runtime.cpu.hugepages import HUGE_PAGE, huge_pages_available, place_in_huge_pages
    from distinfer.runtime.cpu.kernels import use_fast_cpu_linears

    stock = load_full_model(tiny_models[name], "float32", torch.device("cpu"))
    moved = load_full_model(tiny_models[name], "float32", torch.device("cpu"))
    use_fast_cpu_linears(moved, splits=2)
    tied = moved.get_output_embeddings().weight is moved.get_input_embeddings().weight
    nbytes = place_in_huge_pages(moved)
    if not huge_pages_available():  # the kernel's THP setting is "never": nothing moves
        assert nbytes == 0
        return
    params = list(moved.parameters())  # tied parameters once
    assert nbytes == sum(p.numel() * p.element_size() for p in params)
    starts = sorted(p.data_ptr() for p in params)
    assert starts[0] % HUGE_PAGE == 0 and starts[-1] - starts[0] < nbytes + 64 * len(params)
    assert (moved.get_output_embeddings().weight is moved.get_input_embeddings().weight) == tied
    assert count_parameters(moved) == count_parameters(stock)
    ids = torch.tensor([[5, 9, 17, 33, 2, 40, 41]])
    with torch.inference_mode():
        assert torch.allclose(moved(ids).logits, stock(ids).logits, rtol=1e-4, atol=1e-4)


def test_huge_page_weights_are_backed_by_huge_pages() -> None:
    from distinfer.runtime.cpu.hugepages import huge_pages_available, place_in_huge_pages

    model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.Linear(2048, 1024))  # 16 MiB of weights
    expected = [p.detach().clone() for p in model.parameters()]
    nbytes = place_in_huge_pages(model)
    assert all(torch.equal(p, e) for p, e in zip(model.parameters(), expected))
    if not huge_pages_available():
        assert nbytes == 0
        return
    start = min(p.data_ptr() for p in model.parameters())
    assert _anon_huge_kib(start, start + nbytes) >= 8 * 1024  # at least half of it in 2 MiB pages


def test_bench_ratios_pair_engines_within_each_repeat() -> None:
    """The machine's speed drifts between repeats; the ratio of two engines run side by side does not."""
    bench = _bench_module("bench")
    samples = {("hf-generate", 1): [10.0, 20.0, 40.0], ("pp1", 1): [13.0, 26.0, 52.0],
               ("pp2-mb1", 1): [12.0, 24.0, 48.0], ("pp1", 8): [100.0, 50.0, 200.0],
               ("pp2-mb1", 8): [80.0, 40.0, 160.0], ("pp2-mb2", 8): [90.0, 45.0, 100.0]}
    ratios = bench.paired_ratios(bench.repeat_ratios(samples, {("pp1", 1): [0.02, 0.04, 0.01]}, [4e10, 2e10, 8e10],
                                                     4 * 10**8))
    assert ratios["pp1_over_hf_generate_b1"] == pytest.approx(1.3)
    assert ratios["pp2_over_best_one_process_b1"] == pytest.approx(12 / 13)
    assert ratios["pp2_over_best_one_process_b8"] == pytest.approx(0.9)  # the better of 1 and 2 micro-batches
    assert ratios["decode_weight_read_over_copy_bandwidth_b1"] == pytest.approx(0.5)
    assert "pp1_over_hf_generate_b8" not in ratios


def test_bench_runs_neighbouring_engines_in_both_orders() -> None:
    """A fixed order lets the engine that always runs first (or second) carry the machine's drift into a ratio."""
    bench = _bench_module("bench")
    engines = ["hf-generate", "reference", "pp1", "pp2-mb1"]
    orders = [bench.run_order(engines, r) for r in range(4)]
    assert all(sorted(order) == sorted(engines) for order in orders)
    for a, b in zip(engines, engines[1:]):
        first = [order.index(a) < order.index(b) for order in orders]
        assert first.count(True) == first.count(False) == 2, (a, b)


def test_decode_reads_every_weight_but_an_untied_embedding_table(tiny_models) -> None:  # noqa: ANN001
    bandwidth = _bench_module("bandwidth")
    for name, tied in (("tiny-llama", False), ("tiny-gpt2", True)):
        model = load_full_model(tiny_models[name], "float32", torch.device("cpu"))
        total = sum(p.numel() * 4 for p in model.parameters())  # a tied table is one parameter, counted once
        table = model.get_input_embeddings().weight.numel() * 4
        assert bandwidth.decode_read_bytes(model) == (total if tied else total - table), name
    assert bandwidth.CopyBandwidth(megabytes=8).measure(repeats=2) > 1e8  # bytes/s: any machine copies 100 MB/s
    assert bandwidth.StockRowRead(megabytes=8).measure(repeats=1) > 1e8  # bytes/s of weights read by F.linear


def _bench_module(name: str):  # noqa: ANN202
    """A bench/ script as a module of the `bench` package (run from the repository root: `python -m bench.X`)."""
    import importlib

    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.append(root)
    return importlib.import_module(f"bench.{name}")


def test_paired_summary_takes_best_two_stage_engine_per_round() -> None:
    paired = _bench_module("paired")
    rounds = [{"pp1": 100.0, "pp2-mb1": 90.0, "pp2-mb2": 95.0}, {"pp1": 50.0, "pp2-mb1": 49.0, "pp2-mb2": 20.0},
              {"pp1": 200.0, "pp2-mb1": 180.0, "pp2-mb2": 100.0}]
    summary = paired.summarize({"speeds": rounds, "weight_read": [0.5, 0.7, 0.6]})
    assert summary["ratios"] == pytest.approx([0.95, 0.98, 0.9])
    assert summary["ratio_median"] == pytest.approx(0.95)
    assert summary["median_tokens_per_s"] == {"pp1": 100.0, "pp2-mb1": 90.0, "pp2-mb2": 95.0}
    assert summary["rounds"] == 3
    assert summary["weight_read_median"] == pytest.approx(0.6)  # batch 1: reads / the round's copy bandwidth
    assert "weight_read_median" not in paired.summarize({"speeds": rounds, "weight_read": []})
    assert "vs_hf_median" not in summary
    with_hf = [{**r, "hf-generate": hf} for r, hf in zip(rounds, (80.0, 50.0, 100.0))]
    summary = paired.summarize({"speeds": with_hf, "weight_read": []})
    assert summary["vs_hf"] == pytest.approx([1.25, 1.0, 2.0]) and summary["vs_hf_median"] == pytest.approx(1.25)
    assert summary["ratios"] == pytest.approx([0.95, 0.98, 0.9]), "HF generate is not a two-stage engine"
    bounded = paired.summarize({"speeds": with_hf, "weight_read": [], "linear_floor_s": [0.01, 0.01, 0.005]})
    assert bounded["vs_hf_bound"] == pytest.approx([1.25, 2.0, 2.0]), "1 / (floor x HF tokens/s), round by round"
    lines = paired.describe(bounded)  # what paired.py and make bench print
    assert lines[0].startswith("pp1 100.0, pp2-mb1 90.0, pp2-mb2 95.0, hf-generate 80.0 tok/s") and len(lines) == 3
    assert "could reach 2.000 at most" in lines[2]
    reads = paired.describe(paired.summarize({"speeds": rounds, "weight_read": [0.5, 0.7, 0.6]}))
    assert len(reads) == 2 and "weight reads / the round's copy bandwidth 0.600" in reads[1]


def test_local_workers_see_no_gpu_even_when_the_parent_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """`run --local` is the CPU dry run: on a one-GPU workstation rank 1 would otherwise ask for cuda:1."""
    from distinfer.launchers.local import worker_env

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert worker_env()["CUDA_VISIBLE_DEVICES"] == ""
    assert worker_env({"OMP_NUM_THREADS": "1"})["OMP_NUM_THREADS"] == "1"


def test_layer_span_names_first_and_last_layer() -> None:
    from distinfer.runtime.worker import layer_span

    assert layer_span([3, 4, 5]) == "3-5"
    assert layer_span([3]) == "3"
    assert layer_span([]) == ""


def test_eos_prefix_keeps_tokens_through_the_first_eos() -> None:
    from distinfer.runtime.pipeline import eos_prefix

    assert eos_prefix([5, 2, 7, 2], (2, 9)) == [5, 2]
    assert eos_prefix([5, 9], (2, 9)) == [5, 9]
    assert eos_prefix([5, 6], (2,)) == [5, 6]


def test_huge_page_weights_stay_put_when_the_mapping_does_not_fit() -> None:
    """Under a memory cap (DISTINFER_RANK_MEMORY_LIMIT sets RLIMIT_DATA) the mapping may fail: nothing moves."""
    script = (
        "import resource, torch\n"
        "from distinfer.runtime.cpu.hugepages import place_in_huge_pages\n"
        "model = torch.nn.Linear(4096, 8192)\n"  # 128 MiB of weights
        "before = model.weight.data_ptr()\n"
        "used = int(open('/proc/self/status').read().split('VmData:')[1].split()[0]) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_DATA, (used + 64 * 2**20, resource.RLIM_INFINITY))\n"
        "assert place_in_huge_pages(model) == 0 and model.weight.data_ptr() == before\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


_RANK_PERSONALITY = """
import runpy, sys
sys.argv = ["distinfer.runtime"]  # no run folder: the entry point prints its usage and exits 2
try:
    runpy.run_module("distinfer.runtime", run_name="__main__")
except SystemExit:
    pass
print(open("/proc/self/personality").read().strip())
"""


def test_a_rank_keeps_address_space_randomization() -> None:
    """A rank of a multi-rank run starts like any process: no personality change (ADDR_NO_RANDOMIZE, 0x0040000)
    that would weaken an exploit protection."""
    environ = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    out = subprocess.run([sys.executable, "-c", _RANK_PERSONALITY], env=environ, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1], 16) & 0x0040000 == 0


def _hold_turn(name: str, seconds: float, spans) -> None:  # noqa: ANN001
    import time

    from distinfer.runtime.cpu.threads import machine_turn

    with machine_turn(name):
        start = time.monotonic()
        time.sleep(seconds)
        spans.put((start, time.monotonic()))


def test_ranks_on_one_machine_take_turns() -> None:
    """Three processes hold `machine_turn` at once: their turns must not overlap (kernel timings of a node's
    ranks run one at a time)."""
    import multiprocessing
    import tempfile

    context = multiprocessing.get_context("fork")  # the children need nothing but this module's function
    spans = context.Queue()
    name = f"test-{os.getpid()}"
    procs = [context.Process(target=_hold_turn, args=(name, 0.3, spans)) for _ in range(3)]
    for proc in procs:
        proc.start()
    try:
        turns = sorted(spans.get(timeout=60) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        Path(tempfile.gettempdir(), f"distinfer-{name}-{os.getuid()}.lock").unlink(missing_ok=True)
    assert all(earlier[1] <= later[0] for earlier, later in zip(turns, turns[1:])), turns
