"""distinfer's own server: continuous batching token-exact under concurrent arrivals, and the real HTTP server
(`distinfer serve`, uvicorn, in its own process) driven by the official `openai` client and by distinfer's load
generator."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from distinfer.layout import split_layers
from distinfer.models.loading import load_full_model, load_stage_model, load_tokenizer
from distinfer.models.profiles import model_layer_count
from distinfer.net import free_port
from distinfer.serving.engine import ServingEngine
from distinfer.serving.runner import wait_healthy
from distinfer.serving.stages import StageState
from distinfer.serving.template import plain_template

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["Hello", "The capital city of France is", "def fibonacci(n):", "Once upon a time there was a little",
           "import os\nimport sys\n\ndef main():", "Q: what is two plus two?\nA:"]


def generate_alone(model, tokenizer, prompt: str, new: int) -> list[int]:  # noqa: ANN001
    """HF generate on the prompt alone (greedy, the model's EOS), the new tokens through EOS."""
    ids = tokenizer(prompt, return_tensors="pt")
    eos = model.generation_config.eos_token_id
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=eos)
    tokens = out[0, ids["input_ids"].shape[1]:].tolist()
    eos_ids = eos if isinstance(eos, list) else [eos]
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1]
    return tokens


def one_stage_engine(model_dir: Path, groups: int, max_batch: int) -> ServingEngine:
    """The server's engine over the whole model on this process (a one-rank layout), `groups` groups."""
    layout = split_layers(model_layer_count(model_dir), 1)[0]
    model, family = load_stage_model(model_dir, layout, "float32", torch.device("cpu"))
    eos = model.generation_config.eos_token_id
    stage = StageState(model, family, torch.device("cpu"), True, True, groups)
    return ServingEngine(stage, None, tuple(eos if isinstance(eos, list) else [eos]), max_batch=max_batch)


@pytest.mark.parametrize(("name", "groups"), [("tiny-llama", 1), ("tiny-gpt2", 1), ("tiny-llama", 2)])
def test_requests_joining_and_leaving_the_batch_equal_generate_alone(tiny_models, name: str, groups: int) -> None:  # noqa: ANN001
    """Six prompts of different lengths, the first two together (prefilled in one padded forward), the others
    while the rest decode (and leave at different steps): each request's greedy fp32 tokens equal `generate` on
    its prompt alone, with one group or the requests spread over two."""
    model_dir = tiny_models[name]
    model = load_full_model(model_dir, "float32", torch.device("cpu"))
    tokenizer = load_tokenizer(model_dir)
    lengths = [12, 20, 7, 16, 3, 20]
    expected = [generate_alone(model, tokenizer, p, n) for p, n in zip(PROMPTS, lengths)]
    engine = one_stage_engine(model_dir, groups, max_batch=4)
    worker = threading.Thread(target=engine.run_forever, daemon=True)
    worker.start()
    got: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
    ended: dict[int, str] = {}
    try:
        for i, (prompt, new) in enumerate(zip(PROMPTS, lengths)):
            def emit(token: int | None, reason: str | None, i: int = i) -> None:
                if token is not None:
                    got[i].append(token)
                else:
                    ended[i] = reason
            engine.submit(tokenizer(prompt)["input_ids"], new, emit)
            deadline = time.monotonic() + 30
            while i > 1 and len(got[i - 1]) < 2 and time.monotonic() < deadline:  # the last one decodes by now
                time.sleep(0.001)
        deadline = time.monotonic() + 120
        while len(ended) < len(PROMPTS) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.stop()
        worker.join(timeout=10)
    assert engine.failure is None
    assert [got[i] for i in range(len(PROMPTS))] == expected
    assert engine.stats.requests_finished == len(PROMPTS) and engine.stats.generated_tokens_total == sum(map(len, expected))
    assert engine.stats.steps_total < sum(map(len, expected)), "requests shared decode steps"
    assert engine.stats.groups_in_flight_max == groups, "every group had requests at some step"


@contextlib.contextmanager
def running_server(tmp_path: Path, extra: list[str] | None = None, config: Path = REPO / "configs/local-tiny.yaml",
                   env: dict[str, str] | None = None, cores: set[int] | None = None) -> Iterator[str]:
    """`distinfer serve CONFIG` in its own process on a free loopback port (on `cores` only, where given);
    stopped by PID (a multi-rank layout: its torchrun and ranks with it)."""
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "distinfer", "serve", str(config),
                             "--port", str(port), *(extra or [])], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, **(env or {})},
                            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(url, proc.poll, 120)
        except RuntimeError as exc:  # EndpointError
            raise AssertionError(f"{exc}\n{(tmp_path / 'serve.log').read_text()}") from None
        yield url
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then ends by the signal it caught (as the default action would)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM), "SIGTERM stops the server"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_the_openai_client_streams_tokens_as_they_are_generated(tmp_path: Path, tiny_models) -> None:  # noqa: ANN001
    import openai

    model = load_full_model(tiny_models["tiny-llama"], "float32", torch.device("cpu"))
    tokenizer = load_tokenizer(tiny_models["tiny-llama"])
    prompt = "The capital city of France is"
    expected = tokenizer.decode(generate_alone(model, tokenizer, prompt, 48), skip_special_tokens=True)
    with running_server(tmp_path) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        assert [m.id for m in client.models.list().data] == ["tiny-llama"]
        arrivals, text = [], ""
        stream = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=48, temperature=0,
                                           stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                arrivals.append(time.perf_counter())
                text += chunk.choices[0].text
        assert text == expected
        assert len(arrivals) > 10 and arrivals[-1] - arrivals[0] > 0.02, "chunks arrive as generated, not at the end"
        whole = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=48, temperature=0)
        assert whole.choices[0].text == expected and whole.usage.completion_tokens == len(
            generate_alone(model, tokenizer, prompt, 48))
        with pytest.raises(openai.BadRequestError, match="positions"):
            client.completions.create(model="tiny-llama", prompt="x", max_tokens=10**6, temperature=0)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="another-model", prompt="x", max_tokens=4)
        with pytest.raises(openai.BadRequestError, match="not supported"):
            client.completions.create(model="tiny-llama", prompt="x", max_tokens=4, n=2)
        # the chat API: the messages through the plain template (the tiny Llama's tokenizer has no chat template),
        # then the same tokens as a completion of that text, streamed with the role first, and whole
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
        chat_ids = generate_alone(model, tokenizer, plain_template(messages), 24)
        chat_text = tokenizer.decode(chat_ids, skip_special_tokens=True)
        stream = client.chat.completions.create(model="tiny-llama", messages=messages, max_completion_tokens=24,
                                                temperature=0, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat_text
        assert chunks[-1].usage.completion_tokens == len(chat_ids)
        assert chunks[-1].usage.prompt_tokens == len(tokenizer(plain_template(messages))["input_ids"])
        whole = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=24, temperature=0)
        assert whole.choices[0].message.content == chat_text and whole.choices[0].message.role == "assistant"
        with pytest.raises(openai.BadRequestError, match="tools"):
            client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=4,
                                           tools=[{"type": "function", "function": {"name": "f"}}])


@pytest.mark.parametrize(("parallel", "run_id"), [
    ("{engine: pipeline, pp: 2, microbatches: 1}", "pipeline-pp2-b4-mb1-fp32"),
    ("{engine: pipeline, pp: 2, microbatches: 3}", "pipeline-pp2-b4-mb3-fp32"),
    ("{engine: deepspeed, tp: 2}", "deepspeed-tp2-b4-fp32"),
])
def test_multi_rank_layouts_serve_concurrent_requests_token_exact(tmp_path: Path, tiny_models, parallel: str,  # noqa: ANN001
                                                                  run_id: str) -> None:
    """`distinfer serve` of a two-stage pipeline (two gloo ranks) and of DeepSpeed AutoTP over two ranks: requests
    of different lengths arrive while others decode, over HTTP; each one's greedy fp32 tokens equal `generate` on
    its prompt alone; on two stages at least two groups of requests were in the pipeline at once (both busy)."""
    import concurrent.futures

    import openai

    model = load_full_model(tiny_models["tiny-llama"], "float32", torch.device("cpu"))
    tokenizer = load_tokenizer(tiny_models["tiny-llama"])
    lengths = [48, 64, 24, 40, 8, 64]
    expected = [generate_alone(model, tokenizer, p, n) for p, n in zip(PROMPTS, lengths)]
    config = tmp_path / "layout.yaml"
    config.write_text("name: layout\nmodel: {builtin: tiny-llama}\nprompts: prompts/correctness.jsonl\n"
                      f"generation: {{max_new_tokens: 20}}\nparallel: {parallel}\nbatch_size: 4\nreference: none\n")
    with running_server(tmp_path, ["--run", run_id], config=config) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")

        def ask(i: int) -> list[int]:
            time.sleep(0.04 * i)  # arrivals spread over the others' decoding
            ids: list[int] = []
            for chunk in client.completions.create(model="tiny-llama", prompt=PROMPTS[i], max_tokens=lengths[i],
                                                   temperature=0, stream=True):
                ids += chunk.choices[0].model_extra.get("token_ids") or [] if chunk.choices else []
            return ids

        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            got = list(pool.map(ask, range(len(PROMPTS))))
        metrics = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    assert got == expected
    in_flight = int(next(line.split()[-1] for line in metrics.splitlines()
                         if line.startswith("distinfer_groups_in_flight_max")))
    assert in_flight >= 2 if run_id.startswith("pipeline") else in_flight == 1, metrics


def test_a_client_that_goes_away_frees_its_slot(tmp_path: Path, tiny_models) -> None:  # noqa: ANN001
    import http.client

    with running_server(tmp_path) as url:
        host, port = url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        connection.request("POST", "/v1/completions", json.dumps(
            {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 3000, "temperature": 0, "stream": True,
             "ignore_eos": True}), {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and response.read1(256)
        connection.close()  # gone mid-stream
        deadline = time.monotonic() + 30
        while True:
            metrics = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
            if "distinfer_requests_cancelled_total 1" in metrics and "distinfer_requests_running 0" in metrics:
                break
            assert time.monotonic() < deadline, metrics
            time.sleep(0.2)


def test_the_load_generator_against_distinfers_server_gets_the_reference_tokens(tmp_path: Path, tiny_models) -> None:  # noqa: ANN001,E501
    """A serving run (rate 20, 8 requests) against `distinfer serve`: every request's streamed token ids equal
    `generate` on its prompt alone, although the requests overlapped in the running batch."""
    model = load_full_model(tiny_models["tiny-llama"], "float32", torch.device("cpu"))
    tokenizer = load_tokenizer(tiny_models["tiny-llama"])
    prompts = [json.loads(line) for line in (REPO / "prompts/correctness.jsonl").read_text().splitlines()][:8]
    with running_server(tmp_path) as url:
        config = tmp_path / "e.yaml"
        config.write_text(f"name: own\nmodel: {{builtin: tiny-llama}}\nprompts: {REPO / 'prompts/correctness.jsonl'}\n"
                          "generation: {max_new_tokens: 16}\nscenario: {kind: serving, rate: 20, requests: 8, "
                          f"warmup_requests: 0}}\nendpoint: {{url: '{url}', model: tiny-llama}}\n")
        proc = subprocess.run([sys.executable, "-m", "distinfer", "run", str(config), "--local", "--outputs",
                               str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in (tmp_path / "out/own/endpoint-rate20/requests.jsonl").read_text().splitlines()]
    assert len(records) == 8
    for record in records:
        prompt = next(p["prompt"] for p in prompts if p["id"] == record["prompt_id"])
        assert record["token_ids"] == generate_alone(model, tokenizer, prompt, 16), record["prompt_id"]
    summary = json.loads((tmp_path / "out/own/endpoint-rate20/summary.json").read_text())
    assert summary["status"] == "ok" and summary["peak_concurrency"] >= 2, "requests overlapped"


def test_the_chat_page_streams_an_answer_in_a_browser(tmp_path: Path, tiny_models) -> None:  # noqa: ANN001
    """The page at `/` in headless Chromium (Debian's): it sends the prompt, streams the answer into the page and
    shows its TTFT and tokens/s."""
    model = load_full_model(tiny_models["tiny-llama"], "float32", torch.device("cpu"))
    tokenizer = load_tokenizer(tiny_models["tiny-llama"])
    expected = tokenizer.decode(generate_alone(model, tokenizer, "Hello", 16), skip_special_tokens=True)
    from browser import evaluate_when

    with running_server(tmp_path) as url:
        shown = evaluate_when(f"{url}/?prompt=Hello&max_tokens=16",
                              "document.getElementById('figures')?.dataset.done === '1'",
                              "[document.getElementById('answer').textContent, "
                              "document.getElementById('figures').textContent]")
    answer, figures = shown
    assert answer == expected
    assert figures.startswith("TTFT ") and "tokens/s" in figures, figures


def test_a_local_serving_study_starts_the_server_and_checks_its_tokens(tmp_path: Path, tiny_models) -> None:  # noqa: ANN001
    """`distinfer run --local` of a serving scenario without an endpoint, one and two stages: each load starts
    distinfer's server for the layout (two stages: two ranks) with an API key that no bundle file holds, measures
    it, stops it; the served tokens equal the offline reference's; the analysis draws the
    curves and tables the knee."""
    config = tmp_path / "e.yaml"
    config.write_text(f"name: study\nmodel: {{builtin: tiny-llama}}\nprompts: {REPO / 'prompts/correctness.jsonl'}\n"
                      "generation: {max_new_tokens: 12}\nparallel: {engine: pipeline, pp: [1, 2]}\n"
                      "scenario: {kind: serving, rate: [8, inf], requests: 12, warmup_requests: 1, "
                      "slo: {ttft: 2s, tpot: 500ms}}\n")
    proc = subprocess.run([sys.executable, "-m", "distinfer", "run", str(config), "--local", "--outputs",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DISTINFER_API_KEY": KEY})  # the servers' key, in no file
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "out" / "study"
    assert not [p for p in out.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()], "the key leaked"
    served = [f"pipeline-pp{pp}-fp32-rate{rate}" for pp in (1, 2) for rate in ("8", "inf")]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted([*served, "reference-b1-fp32"])
    for name in served:
        assert (out / name / "server.log").exists() and len((out / name / "requests.jsonl").read_text().splitlines()) == 13
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["status"] == "ok" and summary["world_size"] == int(name[len("pipeline-pp")])
    analysis = subprocess.run([sys.executable, "-m", "distinfer", "analyze", str(out), "--out", str(tmp_path / "a")],
                              capture_output=True, text=True, timeout=300)
    assert analysis.returncode == 0, analysis.stderr
    assert "0 problem(s)" in analysis.stdout, analysis.stdout
    import pandas as pd

    correctness = pd.read_csv(tmp_path / "a/study/correctness.csv").set_index("run_id")
    assert set(correctness.index) == set(served)
    assert (correctness["exact_match_rate"] == 1.0).all() and (correctness["reference"] == "reference-b1-fp32").all()
    assert (correctness["prompts"] == 13).all(), "every prompt served once: the warm-up one and twelve more"
    runtime = json.loads((out / served[0] / "run.json").read_text())["runtime"]
    assert runtime["device"] == "cpu" and runtime["hostnames"] == [os.uname().nodename], runtime
    prediction = pd.read_csv(tmp_path / "a/study/prediction.csv")
    assert set(served) <= set(prediction["run_id"]), "served runs are set beside their predictions"
    assert (prediction["predicted"] > 0).all()
    rows = prediction[prediction["run_id"].isin(served)]
    assert rows["calibration"].str.endswith("server costs: this experiment's served runs of one rank").all()
    assert set(rows[rows["calibrated_on"]]["run_id"]) == {n for n in served if n.startswith("pipeline-pp1")}
    knee = pd.read_csv(tmp_path / "a/study/serving_knee.csv")
    assert sorted(knee["world_size"]) == [1, 2] and (knee["loads_measured"] == 2).all(), "one row per layout"
    plots = {p.stem for p in (tmp_path / "a/study/plots").glob("*.svg")}
    assert {"latency_throughput", "goodput"} <= plots


KEY = "test-key-5f0c1e9a7d"
TOO_BIG = 2**80
# (what a client sends, the status it gets, a word the answer names): each must leave the server healthy.
HOSTILE = [
    ({"seed": TOO_BIG, "temperature": 1}, 400, "seed"),
    ({"seed": -(10**30), "temperature": 1}, 400, "seed"),
    ({"seed": 2**63 - 1, "temperature": 1, "top_k": 5}, 200, ""),
    ({"seed": -(2**63), "temperature": 0.7, "top_p": 0.9}, 200, ""),
    ({"temperature": 1e-30}, 200, ""),
    ({"temperature": 1e300}, 400, "temperature"),
    ({"temperature": -1}, 400, "temperature"),
    ({"temperature": "hot"}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"top_p": 1e-300, "temperature": 1}, 200, ""),
    ({"top_k": TOO_BIG}, 400, "top_k"),
    ({"top_k": 10**9, "temperature": 1}, 200, ""),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": TOO_BIG}, 400, "max_tokens"),
    ({"max_tokens": 10**9}, 400, "positions"),
    ({"max_tokens": 4, "max_completion_tokens": 5}, 400, "max_completion_tokens"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [-1]}, 400, "prompt"),
    ({"prompt": [TOO_BIG]}, 400, "prompt"),
    ({"prompt": [[1, 2]]}, 400, "prompt"),
    ({"prompt": None}, 400, "prompt"),
    ({"prompt": "x" * 200_000}, 400, "positions"),
    ({"n": 2}, 400, "n > 1"),
    ({"n": TOO_BIG}, 400, "n"),
    ({"model": 123}, 400, "model"),
    ({"model": "other"}, 404, "other"),
    ({"stream_options": "yes"}, 400, "stream_options"),
    ({"logprobs": 5}, 400, "logprobs"),
    ({"echo": True}, 400, "echo"),
    ({"stop": ["\n"]}, 400, "stop"),
    ({"frobnicate": 1}, 400, "frobnicate"),
    ({"user": "someone", "frequency_penalty": 0, "logprobs": None}, 200, ""),
    ({"stream": True, "temperature": 0.8, "seed": 7, "stream_options": {"include_usage": True}}, 200, ""),
    ({"ignore_eos": {"a": 1}}, 400, "ignore_eos"),
]
# The same for the chat API (its own fields and the shared ones).
CHAT_HOSTILE = [
    ({"messages": []}, 400, "messages"),
    ({"messages": "hello"}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "content"),
    ({"messages": [{"role": "user", "content": "x", "extra": 1}]}, 400, "extra"),
    ({"messages": [{"role": "user", "content": "x"}] * 10_001}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 200_000}]}, 400, "positions"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "tools": []}, 200, ""),
    ({"tools": [{"type": "function"}]}, 400, "tools"),
    ({"prompt": "x"}, 400, "prompt"),
    ({"seed": TOO_BIG, "temperature": 1}, 400, "seed"),
    ({"max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ({"stream": True, "stream_options": {"include_usage": True}, "tool_choice": "none"}, 200, ""),
]
RAW_BODIES = [b"not json", b"[1, 2]", b"null", b'{"model": "tiny-llama", "prompt": "x", "temperature": NaN}',
              b"[" * 100_000 + b"]" * 100_000, b'{"model": "tiny-llama", "prompt": "x", "max_tokens": 1e999}']


def _post(url: str, body: bytes, key: str | None = KEY, path: str = "/v1/completions") -> tuple[int, str]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url + path, body, headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _healthy(url: str) -> bool:
    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        return response.status == 200


@pytest.mark.parametrize("parallel", ["{engine: pipeline, pp: 1}", "{engine: pipeline, pp: 2}"])
def test_hostile_requests_get_an_answer_and_never_stop_the_server(tmp_path: Path, tiny_models, parallel: str) -> None:  # noqa: ANN001
    """A table of hostile and odd requests against one rank and two stages, with an API key: each gets its
    status (a 400 names the field), /health stays 200 after each, a greedy request gives the same tokens at the
    end as at the start, a request without the key gets 401, and the key is in no log line."""
    config = tmp_path / "layout.yaml"
    config.write_text("name: layout\nmodel: {builtin: tiny-llama}\nprompts: prompts/correctness.jsonl\n"
                      f"parallel: {parallel}\nreference: none\n")
    run_id = f"pipeline-pp{2 if 'pp: 2' in parallel else 1}-b1-mb1-fp32"
    greedy = json.dumps({"model": "tiny-llama", "prompt": "Once upon a time", "max_tokens": 12,
                         "temperature": 0}).encode()
    with running_server(tmp_path, ["--run", run_id, "--log-requests"], config=config,
                        env={"DISTINFER_API_KEY": KEY}) as url:
        status, before = _post(url, greedy)
        assert status == 200, before
        for fields, expected, word in HOSTILE:
            body = {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 4, **fields}
            status, answer = _post(url, json.dumps(body).encode())
            assert (status, word in answer) == (expected, True), (fields, status, answer[:300])
            assert _healthy(url), fields
        for fields, expected, word in CHAT_HOSTILE:
            body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4,
                    **fields}
            status, answer = _post(url, json.dumps(body).encode(), path="/v1/chat/completions")
            assert (status, word in answer) == (expected, True), (fields, status, answer[:300])
            assert _healthy(url), fields
        for raw in RAW_BODIES:
            for path in ("/v1/completions", "/v1/chat/completions"):
                status, answer = _post(url, raw, path=path)
                assert status == 400, (path, raw[:60], status, answer[:300])
                assert _healthy(url), raw[:60]
        assert _post(url, greedy, key=None)[0] == 401
        assert _post(url, greedy, key="wrong")[0] == 401
        with urllib.request.urlopen(url + "/version", timeout=10) as response:
            assert json.loads(response.read())["tokenizer"] == str(tiny_models["tiny-llama"].resolve())
        status, after = _post(url, greedy)
        assert status == 200 and json.loads(after)["choices"][0]["token_ids"] == json.loads(before)["choices"][0][
            "token_ids"]
    log = (tmp_path / "serve.log").read_text()
    assert KEY not in log
    assert "401 (no valid API key)" in log and "400 " in log and "unknown field(s) 'frobnicate'" in log, log[-2000:]
    assert log.count("POST /v1/completions 200") >= 2 and "shutting down:" in log, log[-2000:]
