"""What a serving study sends (`scenario.input`): length distributions, shared prefixes and ShareGPT files, drawn
in this process and checked against the shipped sample; then each kind sent to `distinfer serve`, whose reported
token counts (`usage`) must equal the planned ones."""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.experiments import experiment_file
from distinfer.scenario import LengthSpec, RunLoad, ScenarioSpec
from distinfer.serving.lengths import draw_length
from distinfer.serving.sharegpt import WorkloadFileError, read_sharegpt
from distinfer.serving.workload import ModelShape, build_requests, sharegpt_exchanges
from distinfer.spec import SpecError, load_experiment

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "prompts" / "workloads" / "sharegpt-sample.json"
PROMPTS = REPO / "prompts" / "correctness.jsonl"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_models) -> Iterator[str]:  # noqa: ANN001
    """One `distinfer serve` of the tiny Llama for the module's loads, on the last core: the loads' clients run on
    the others (`run_client`), as on hosts of their own (a client sharing the server's core starts requests late
    whenever the server computes)."""
    from test_serve import running_server

    with running_server(tmp_path_factory.mktemp("served"), cores={CORES[-1]}) as url:
        yield url


CORES = sorted(os.sched_getaffinity(0))


def run_client(config: Path, out: Path) -> subprocess.CompletedProcess:
    """`distinfer run CONFIG --local` (an endpoint experiment) on the cores the served fixture leaves free."""
    return subprocess.run([sys.executable, "-m", "distinfer", "run", str(config), "--local", "--outputs", str(out)],
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: os.sched_setaffinity(0, set(CORES[:-1] or CORES)))


def draws(spec: dict, n: int = 20_000, seed: int = 1, limit: int | None = None) -> list[int]:
    rng = random.Random(seed)
    length = LengthSpec(**spec)
    return [draw_length(length, rng, limit) for _ in range(n)]


def test_lengths_follow_their_distribution_seeded_and_clamped() -> None:
    normal = draws({"mean": 200, "distribution": "normal", "stdev": 50})
    assert statistics.mean(normal) == pytest.approx(200, rel=0.02)
    assert statistics.stdev(normal) == pytest.approx(50, rel=0.05)
    lognormal = draws({"mean": 200, "distribution": "lognormal", "stdev": 150})
    assert statistics.mean(lognormal) == pytest.approx(200, rel=0.05), "the lengths' own mean, not exp(mu)"
    assert statistics.stdev(lognormal) == pytest.approx(150, rel=0.15)
    assert statistics.median(lognormal) < 180, "a right tail: median below mean"
    uniform = draws({"mean": 100, "spread": 0.5})
    assert min(uniform) == 50 and max(uniform) == 150
    clamped = draws({"mean": 100, "distribution": "normal", "stdev": 80, "min": 20, "max": 160})
    assert min(clamped) == 20 and max(clamped) == 160
    assert max(draws({"mean": 100, "distribution": "normal", "stdev": 80}, limit=120)) == 120, "the model's room"
    assert draws({"mean": 7}, n=3) == [7, 7, 7]
    assert draws({"mean": 200, "distribution": "normal", "stdev": 50}, n=50, seed=4) == \
        draws({"mean": 200, "distribution": "normal", "stdev": 50}, n=50, seed=4)


@pytest.mark.parametrize(("spec", "message"), [
    ({"mean": 32, "min": 64, "max": 8}, "max 8 is below min 64"),
    ({"mean": 32, "distribution": "normal"}, "needs stdev"),
    ({"mean": 32, "stdev": 3}, "stdev belongs to distribution: normal or lognormal"),
    ({"mean": 32, "distribution": "normal", "stdev": 3, "spread": 0.1}, "spread belongs to distribution: uniform"),
    ({"mean": 300, "max": 200}, "mean 300 is outside min 1 .. max 200"),
    ({"mean": 32, "distribution": "poisson"}, "distribution"),
])
def test_bad_lengths_are_named(tmp_path: Path, spec: dict, message: str) -> None:
    config = experiment_file(tmp_path / "e.yaml", "bad", scenario={
        "kind": "serving", "rate": 1, "input": "synthetic", "synthetic": {"input_tokens": spec, "output_tokens": 8}},
        endpoint={"url": "http://127.0.0.1:1", "model": "m"})
    with pytest.raises(SpecError, match="scenario.synthetic.input_tokens") as caught:
        load_experiment(config)
    assert message in str(caught.value)


def load(**scenario: object) -> RunLoad:
    return RunLoad.of(ScenarioSpec(kind="serving", rate=1, **scenario), "rate", 1)


def test_synthetic_and_shared_prefix_prompts_have_their_planned_token_ids(tiny_models) -> None:  # noqa: ANN001
    model = ModelShape.of(str(tiny_models["tiny-llama"]))
    synthetic = build_requests(load(input="synthetic", requests=40, warmup_requests=2, synthetic={
        "input_tokens": {"mean": 64, "distribution": "lognormal", "stdev": 40, "max": 400},
        "output_tokens": {"mean": 16, "spread": 0.5}}), PROMPTS, 8, model)
    assert len(synthetic) == 42 and [r.warmup for r in synthetic[:3]] == [True, True, False]
    assert all(len(r.prompt) == r.input_tokens and 8 <= r.max_tokens <= 24 for r in synthetic)
    assert len({r.input_tokens for r in synthetic}) > 10, "lengths drawn, not one"
    assert all(0 <= t < model.vocab for r in synthetic for t in r.prompt)
    shared = build_requests(load(input="shared_prefix", requests=12, warmup_requests=0, shared_prefix={
        "groups": 3, "prefix_tokens": {"mean": 48, "spread": 0.5}, "suffix_tokens": 8, "output_tokens": 4}),
        PROMPTS, 8, model)
    by_group: dict[int, list] = {}
    for request in shared:
        by_group.setdefault(request.group, []).append(request.prompt)
    assert sorted(by_group) == [0, 1, 2] and all(len(p) == 4 for p in by_group.values())
    for prompts in by_group.values():
        prefix = len(prompts[0]) - 8
        assert all(p[:prefix] == prompts[0][:prefix] and len(p) == prefix + 8 for p in prompts)
        assert len({tuple(p[prefix:]) for p in prompts}) == 4, "suffixes of their own"
    assert len({len(p[0]) for p in by_group.values()} | {tuple(p[0][:4]) for p in by_group.values()}) > 1


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gpt2"])
def test_chat_prompts_are_texts_the_tokenizer_reads_back_at_their_length(tiny_models, model_name: str) -> None:  # noqa: ANN001
    """Through the chat API synthetic and shared-prefix prompts are texts: each re-tokenizes (without special
    tokens) to its drawn length, a group's prompts open with one text, and the planned input is the plain
    template's count with the model's BOS."""
    from distinfer.serving.template import plain_template
    from distinfer.tokencount import codec, token_counter

    model = ModelShape.of(str(tiny_models[model_name]))
    found, count = codec(model.path), token_counter(model.path)
    synthetic = build_requests(load(input="synthetic", api="chat", requests=40, warmup_requests=0, synthetic={
        "input_tokens": {"mean": 64, "distribution": "uniform", "spread": 0.9}, "output_tokens": 4}),
        PROMPTS, 8, model)
    drawn = build_requests(load(input="synthetic", requests=40, warmup_requests=0, synthetic={
        "input_tokens": {"mean": 64, "distribution": "uniform", "spread": 0.9}, "output_tokens": 4}),
        PROMPTS, 8, model)
    lengths = [len(ids) for ids in found.encode([r.prompt for r in synthetic])]
    exact = sum(n == len(d.prompt) for n, d in zip(lengths, drawn, strict=True))
    assert exact >= 34 and all(abs(n - len(d.prompt)) <= 1 for n, d in zip(lengths, drawn, strict=True)), lengths
    assert [r.input_tokens for r in synthetic] == \
        count([plain_template([{"role": "user", "content": r.prompt}]) for r in synthetic])
    shared = build_requests(load(input="shared_prefix", api="chat", requests=6, warmup_requests=0, shared_prefix={
        "groups": 2, "prefix_tokens": 40, "suffix_tokens": 8, "output_tokens": 4}), PROMPTS, 8, model)
    for group in (0, 1):
        texts = [r.prompt for r in shared if r.group == group]
        common = os.path.commonprefix(texts)
        assert len(texts) == 3 and len(found.encode([common])[0]) >= 39, texts


def test_sharegpt_sample_gives_first_questions_with_the_answers_token_counts(tiny_models) -> None:  # noqa: ANN001
    from distinfer.models.loading import load_tokenizer

    records = json.loads(SAMPLE.read_text())
    exchanges = read_sharegpt(SAMPLE)
    assert len(exchanges) == sum(any(t["from"] == "gpt" for t in r["conversations"]) for r in records)
    model = ModelShape.of(str(tiny_models["tiny-llama"]))
    tokenizer = load_tokenizer(tiny_models["tiny-llama"])
    kept = sharegpt_exchanges(load(input="sharegpt", sharegpt={"file": str(SAMPLE)}), model)
    answers = {e.id: e.answer for e in exchanges}
    for ident, prompt, n_in, n_out in kept:
        assert n_in == len(tokenizer(prompt)["input_ids"])
        assert n_out == len(tokenizer(answers[ident], add_special_tokens=False)["input_ids"])
        assert n_in >= 4 and n_out >= 4
    limited = sharegpt_exchanges(load(input="sharegpt", sharegpt={"file": str(SAMPLE), "max_input_tokens": 40,
                                                                 "max_output_tokens": 30}), model)
    assert 0 < len(limited) < len(kept) and all(i <= 40 and o <= 30 for _, _, i, o in limited)
    requests = build_requests(load(input="sharegpt", requests=60, warmup_requests=0, sharegpt={"file": str(SAMPLE)}),
                              PROMPTS, 8, model)
    assert {r.prompt_id for r in requests} == {k[0] for k in kept}, "a seeded sample of every kept exchange"
    assert all(r.max_tokens == next(k[3] for k in kept if k[0] == r.prompt_id) for r in requests)


@pytest.mark.parametrize(("records", "message"), [
    ('{"conversations": []}', "line 1: a ShareGPT file is a JSON list"),
    ('[\n{"conversations": [{"from": "human", "value": "hi"}]},\n{"turns": []}\n]', "line 3: field 'conversations'"),
    ('[{"conversations": [{"from": "robot", "value": "hi"}]}]', "each turn is {from: human|gpt|system"),
    ('[{"conversations": [{"from": "human", "value": 3}]}]', "each turn is"),
    ('[\n{"conversations": []},\n{"conversations": [}\n]', "line 3: not JSON"),
    ('[{"conversations": []} {"conversations": []}]', "expected ',' or ']'"),
])
def test_a_malformed_sharegpt_file_names_its_line_and_field(tmp_path: Path, records: str, message: str) -> None:
    path = tmp_path / "conversations.json"
    path.write_text(records)
    with pytest.raises(WorkloadFileError, match=r"conversations\.json: ") as caught:
        read_sharegpt(path)
    assert message in str(caught.value)


@pytest.mark.slow
def test_each_workload_reaches_distinfers_server_with_its_planned_token_counts(tmp_path: Path, served: str) -> None:
    """`distinfer serve` on the tiny Llama; one endpoint run per kind, as a user runs them: the prompt tokens the
    server reports equal the planned ones (token-id prompts exactly, ShareGPT text within one token), every
    request generates its planned output (ignore_eos), and one prefix group's prompts share their prefix."""
    kinds = {
        "synthetic": {"synthetic": {"input_tokens": {"mean": 40, "distribution": "normal", "stdev": 15, "max": 90},
                                    "output_tokens": {"mean": 6, "spread": 0.5}}},
        "shared_prefix": {"shared_prefix": {"groups": 2, "prefix_tokens": 32, "suffix_tokens": {"mean": 8, "spread": 0.5},
                                            "output_tokens": 4}},
        "sharegpt": {"sharegpt": {"file": str(SAMPLE), "max_input_tokens": 120, "max_output_tokens": 12}},
        "synthetic_chat": {"input": "synthetic", "api": "chat", "synthetic": {"input_tokens": 30, "output_tokens": 5}},
    }
    for kind, section in kinds.items():
        config = experiment_file(tmp_path / f"{kind}.yaml", kind, endpoint={"url": served, "model": "tiny-llama"},
                                 scenario={"kind": "serving", "rate": 40, "requests": 12, "warmup_requests": 0,
                                           "ignore_eos": True, "input": kind, **section})
        proc = run_client(config, tmp_path / "out")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        records = [json.loads(line) for line in (tmp_path / f"out/{kind}/endpoint-rate40/requests.jsonl").open()]
        assert len(records) == 12 and all(r["status"] == 200 for r in records), records
        for record in records:
            exact = 0 if kind != "sharegpt" else 1
            assert abs(record["prompt_tokens"] - record["planned_input_tokens"]) <= exact, (kind, record)
            assert record["output_tokens"] == record["planned_output_tokens"], (kind, record)
        if kind == "shared_prefix":
            assert {r["group"] for r in records} == {0, 1}
            summary = json.loads((tmp_path / "out/shared_prefix/endpoint-rate40/summary.json").read_text())
            assert summary["prefix_cache"] == "not reported" and summary["prefix_cache_hit_rate"] is None
    # the analysis tables what was sent beside what was planned, and TTFT by prefix group
    analysis = subprocess.run([sys.executable, "-m", "distinfer", "analyze", str(tmp_path / "out/shared_prefix"),
                               "--out", str(tmp_path / "a")], capture_output=True, text=True, timeout=300)
    assert analysis.returncode == 0, analysis.stdout + analysis.stderr
    import pandas as pd

    table = pd.read_csv(tmp_path / "a/shared_prefix/workload.csv")
    whole = table[table["by"] == "all"].iloc[0]
    assert whole["requests"] == 12 and whole["prompt_tokens_p50"] == whole["planned_input_p50"]
    assert sorted(table[table["by"] == "group"]["key"]) == [0, 1] and table["ttft_p50_s"].gt(0).all()
    assert (tmp_path / "a/shared_prefix/plots/workload.svg").is_file()


VLLM_METRICS = """# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 900.0
vllm:prefix_cache_queries_total{engine="1",model_name="m"} 100.0
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 512.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
"""


def test_the_prefix_cache_hit_rate_is_the_change_of_vllms_counters_over_the_load() -> None:
    from distinfer.serving.server_metrics import PREFIX_HITS, PREFIX_QUERIES, parse, prefix_cache

    before = parse(VLLM_METRICS)
    assert before[PREFIX_QUERIES] == 1000.0 and before[PREFIX_HITS] == 512.0, "summed over engines"
    after = {**before, PREFIX_QUERIES: 2000.0, PREFIX_HITS: 1262.0}
    assert prefix_cache(before, after) == {"queried_tokens": 1000.0, "hit_tokens": 750.0, "hit_rate": 0.75}
    assert prefix_cache(before, before)["hit_rate"] is None, "nothing queried: no rate, not 0"
    assert prefix_cache({"distinfer_requests_total": 1.0}, {"distinfer_requests_total": 2.0}) is None
    assert prefix_cache(None, after) is None and parse("<html>not metrics{") == {}


def test_sessions_take_the_files_questions_in_order_with_their_answers_lengths(tiny_models) -> None:  # noqa: ANN001
    from distinfer.serving.sessions import build_sessions
    from distinfer.serving.sharegpt import read_conversations

    conversations = {c.id: c for c in read_conversations(SAMPLE)}
    spec = {"file": str(SAMPLE), "turns": {"mean": 3, "spread": 0.67}, "think_time_s": 0.5}
    sessions = build_sessions(load(input="sessions", requests=20, warmup_requests=1, sessions=spec),
                              str(tiny_models["tiny-llama"]), 21)
    assert len(sessions) == 21 and sessions[0].warmup and not sessions[1].warmup
    assert len({len(s.questions) for s in sessions}) > 1 and all(1 <= len(s.questions) <= 4 for s in sessions)
    for session in sessions:
        exchanges = conversations[session.id].exchanges
        assert list(session.questions) == [q for q, _ in exchanges[: len(session.questions)]]
        assert len(session.max_tokens) == len(session.questions) and session.think_s == 0.5
    fixed = build_sessions(load(input="sessions", sessions={**spec, "output_tokens": 5}), "", 3)
    assert all(set(s.max_tokens) == {5} for s in fixed), "no tokenizer needed for set output lengths"


@pytest.mark.slow
@pytest.mark.parametrize("api", ["chat", "completions"])
def test_a_session_turn_holds_the_history_and_the_answers_the_server_gave(tmp_path: Path, tiny_models,  # noqa: ANN001
                                                                          served: str, api: str) -> None:
    """Four sessions of up to three turns against `distinfer serve`, through either API: turn k waits for turn
    k-1's answer and the think time, and its prompt is the plain template of the questions so far and the answers
    the server gave (the server's prompt-token count equals that text's count)."""
    from distinfer.models.loading import load_tokenizer
    from distinfer.serving.sharegpt import read_conversations
    from distinfer.serving.template import plain_template

    tokenizer = load_tokenizer(tiny_models["tiny-llama"])
    questions = {c.id: [q for q, _ in c.exchanges] for c in read_conversations(SAMPLE)}
    config = experiment_file(tmp_path / "s.yaml", "sessions", endpoint={"url": served, "model": "tiny-llama"},
                             scenario={"kind": "serving", "rate": 20, "requests": 4, "warmup_requests": 0,
                                       "input": "sessions", "api": api, "sessions": {
                                           "file": str(SAMPLE), "turns": {"mean": 3, "min": 2, "max": 3},
                                           "think_time_s": 0.05, "output_tokens": 6}})
    proc = run_client(config, tmp_path / "out")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "out/sessions/endpoint-rate20"
    records = [json.loads(line) for line in (out / "requests.jsonl").open()]
    by_session: dict[int, list[dict]] = {}
    for record in records:
        by_session.setdefault(record["session"], []).append(record)
    assert len(by_session) == 4 and max(len(turns) for turns in by_session.values()) >= 2
    for turns in by_session.values():
        turns.sort(key=lambda r: r["turn"])
        asked = questions[turns[0]["prompt_id"].rsplit("-t", 1)[0]]
        history: list[dict[str, str]] = []
        for k, record in enumerate(turns):
            assert record["turn"] == k and record["status"] == 200 and record["output_tokens"] == 6
            if k:
                assert record["sent_s"] >= turns[k - 1]["end_s"] + 0.05, "the next question waits for the answer"
            history.append({"role": "user", "content": asked[k]})
            assert record["prompt_tokens"] == len(tokenizer(plain_template(history))["input_ids"]), (k, history)
            history.append({"role": "assistant", "content": record["text"]})
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["by_turn"]) >= {"0", "1"} and summary["by_turn"]["1"]["prompt_tokens"]["mean"] > \
        summary["by_turn"]["0"]["prompt_tokens"]["mean"], "the history grows"


def test_chat_messages_go_through_the_models_template_or_the_plain_one(tiny_models) -> None:  # noqa: ANN001
    from distinfer.models.loading import load_tokenizer
    from distinfer.serving.chat import chat_prompt_ids
    from distinfer.serving.protocol import ChatMessage, RequestError
    from distinfer.serving.template import plain_template

    tokenizer = load_tokenizer(tiny_models["tiny-llama"])
    messages = [ChatMessage(role="developer", content="Be brief."),
                ChatMessage(role="user", content=[{"type": "text", "text": "Why "}, {"type": "text", "text": "cache?"}])]
    plain = plain_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why cache?"}])
    assert plain == "System: Be brief.\nUser: Why cache?\nAssistant:"
    assert chat_prompt_ids(tokenizer, messages) == tokenizer(plain)["input_ids"], "no template: the plain one, BOS"
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                               "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    text = f"{tokenizer.bos_token}<|system|>Be brief.<|user|>Why cache?<|assistant|>"
    assert chat_prompt_ids(tokenizer, messages) == tokenizer(text, add_special_tokens=False)["input_ids"]
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(RequestError, match="roles must alternate"):
        chat_prompt_ids(tokenizer, messages)


MOONCAKE = REPO / "prompts" / "workloads" / "mooncake-sample.jsonl"
AZURE = REPO / "prompts" / "workloads" / "azure-sample.csv"


def test_the_trace_samples_read_in_order_from_zero() -> None:
    from distinfer.serving.traces import read_trace

    for path, count in ((MOONCAKE, 60), (AZURE, 200)):
        records = read_trace(path)
        times = [r.at_s for r in records]
        assert len(records) == count and times[0] == 0 and times == sorted(times) and 2 < times[-1] < 60, path
        assert all(r.input_tokens >= 1 and r.output_tokens >= 1 for r in records)
    assert read_trace(MOONCAKE)[0].hash_ids and not read_trace(AZURE)[0].hash_ids


@pytest.mark.parametrize(("name", "text", "message"), [
    ("t.jsonl", '{"timestamp": 0, "input_length": -5, "output_length": 4}\n', "line 1: field 'input_length'"),
    ("t.jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 4}\n{"timestamp": -1, "input_length": 5, '
                '"output_length": 4}\n', "line 2: field 'timestamp'"),
    ("t.jsonl", '{"timestamp": 9, "input_length": 5, "output_length": 4}\n{"timestamp": 3, "input_length": 5, '
                '"output_length": 4}\n', "line 2: field 'timestamp': goes back"),
    ("t.jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 4, "hash_ids": ["a"]}\n', "field 'hash_ids'"),
    ("t.jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 4, "hash_ids": [1.5]}\n', "field 'hash_ids'"),
    ("t.jsonl", '{"timestamp": 0, "input_length": 5\n', "line 1: not JSON"),
    ("t.jsonl", '{"timestamp": Infinity, "input_length": 5, "output_length": 4}\n', "field 'timestamp'"),
    ("t.jsonl", '{"timestamp": 0, "input_length": 1099511627776, "output_length": 4}\n', "field 'input_length'"),
    ("t.jsonl", "\n", "no requests"),
    ("t.csv", "TIME,ContextTokens,GeneratedTokens\n", "the header lacks TIMESTAMP"),
    ("t.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,5,5\n", "line 2: field 'TIMESTAMP'"),
    ("t.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,5,x\n", "field 'GeneratedTokens'"),
    ("t.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,0,5\n", "field 'ContextTokens'"),
])
def test_a_malformed_trace_names_its_line_and_field(tmp_path: Path, name: str, text: str, message: str) -> None:
    from distinfer.serving.traces import read_trace

    (tmp_path / name).write_text(text)
    with pytest.raises(WorkloadFileError, match=rf"{name}: ") as caught:
        read_trace(tmp_path / name)
    assert message in str(caught.value)


def test_trace_requests_keep_the_traces_times_lengths_and_shared_blocks(tiny_models) -> None:  # noqa: ANN001
    from distinfer.serving.traces import read_trace

    model = ModelShape.of(str(tiny_models["tiny-llama"]))
    records = read_trace(MOONCAKE)
    spec = {"file": str(MOONCAKE), "block_tokens": 16}
    trace = ScenarioSpec(kind="serving", input="trace", trace=spec, requests=30, warmup_requests=2)
    requests = build_requests(RunLoad.of(trace, "trace", 0.5), PROMPTS, 8, model)
    warm, measured = requests[:2], requests[2:]
    assert all(r.warmup and r.at_s is None for r in warm) and len(measured) == 30
    assert [r.at_s for r in measured] == [pytest.approx(r.at_s * 0.5) for r in records[:30]]
    assert [len(r.prompt) for r in measured] == [r.input_tokens for r in records[:30]]
    assert [r.max_tokens for r in measured] == [r.output_tokens for r in records[:30]]
    first_block: dict[int, list[int]] = {}
    for request, record in zip(measured, records, strict=False):
        block = request.prompt[:16]
        assert first_block.setdefault(record.hash_ids[0], block) == block, "equal hash ids, equal token ids"
    assert len({tuple(b) for b in first_block.values()}) == len(first_block)
    shorter = ScenarioSpec(kind="serving", input="trace", trace=spec, duration_s=2.0, warmup_requests=0)
    limited = build_requests(RunLoad.of(shorter, "trace", 1.0), PROMPTS, 8, model)
    assert limited and max(r.at_s for r in limited) <= 2.0 < records[len(limited)].at_s


@pytest.mark.slow
def test_a_trace_is_replayed_on_its_own_times(tmp_path: Path, served: str) -> None:
    """The first 120 requests of the Azure sample (so that the p99 is not the single worst send) replayed 4 x as fast
    against `distinfer serve`: sent within 2 ms of the trace's time / 4 (p99), with the trace's prompt and output
    lengths as the server counts them."""
    from distinfer.serving.traces import read_trace

    records = read_trace(AZURE)[:120]
    config = experiment_file(tmp_path / "t.yaml", "replay", endpoint={"url": served, "model": "tiny-llama"},
                             scenario={"kind": "serving", "input": "trace", "requests": 120, "warmup_requests": 1,
                                       "ignore_eos": True, "trace": {"file": str(AZURE), "time_scale": 0.25}})
    proc = run_client(config, tmp_path / "out")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "out/replay/endpoint-trace0.25"
    sent = [json.loads(line) for line in (out / "requests.jsonl").open()]
    measured = sorted((r for r in sent if not r["warmup"]), key=lambda r: r["index"])
    assert len(measured) == 120 and all(r["status"] == 200 for r in measured)
    start = measured[0]["planned_s"]
    assert [r["planned_s"] - start for r in measured] == [pytest.approx(t.at_s / 4, abs=1e-6) for t in records]
    lags = sorted(r["sent_s"] - r["planned_s"] for r in measured)
    assert lags[min(len(lags) - 1, int(0.99 * len(lags)))] < 0.002, lags[-10:]
    assert [(r["prompt_tokens"], r["output_tokens"]) for r in measured] == \
        [(t.input_tokens, t.output_tokens) for t in records]


def test_the_worst_lengths_a_file_can_ask_stay_bounded(tmp_path: Path, tiny_models) -> None:  # noqa: ANN001
    """A lognormal tail with a huge stdev, a length past any context window, and a trace line naming a hundred
    thousand hash ids for a ten-token prompt: refused, or drawn within MAX_LENGTH, and built at once."""
    from distinfer.scenario import MAX_LENGTH

    tail = draws({"mean": 1, "distribution": "lognormal", "stdev": MAX_LENGTH}, n=2000)
    assert max(tail) <= MAX_LENGTH and min(tail) >= 1
    assert max(draws({"mean": 1, "distribution": "normal", "stdev": MAX_LENGTH}, n=2000)) <= MAX_LENGTH
    with pytest.raises(ValueError, match="mean"):
        LengthSpec(mean=2**40)
    trace = tmp_path / "wide.jsonl"
    trace.write_text(json.dumps({"timestamp": 0, "input_length": 10, "output_length": 2,
                                 "hash_ids": list(range(100_000))}) + "\n")
    spec = ScenarioSpec(kind="serving", input="trace", trace={"file": str(trace)}, warmup_requests=0)
    (request,) = build_requests(RunLoad.of(spec, "trace", 1.0), PROMPTS, 8,
                                ModelShape.of(str(tiny_models["tiny-llama"])))
    assert len(request.prompt) == 10
