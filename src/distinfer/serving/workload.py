"""What a serving run sends (`scenario.input`): the experiment's prompts, cycled; synthetic token-id prompts of
lengths drawn from a distribution; groups of requests that share a prefix; the conversations of a ShareGPT
file; or a timestamped trace, on its own schedule.

Every draw comes from a generator seeded by the scenario: the same scenario sends the same requests on every
run and to every server. Token-id prompts (synthetic, shared_prefix) have exactly their planned length; through
the chat API (text only) they are written as texts that the model's tokenizer reads back as that many tokens. A
ShareGPT prompt is text, its planned length the model tokenizer's count (tokencount.py). Each request keeps
its planned input and output tokens, which requests.jsonl records beside what the server reported.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from distinfer.bundle import read_json
from distinfer.models.profiles import max_positions
from distinfer.prompts import load_prompts
from distinfer.scenario import RunLoad
from distinfer.serving.client import Request
from distinfer.serving.lengths import draw_length
from distinfer.serving.sharegpt import WorkloadFileError, read_sharegpt
from distinfer.serving.template import plain_template
from distinfer.serving.traces import read_trace
from distinfer.tokencount import codec, exact_text, has_chat_template, token_counter

DEFAULT_REQUESTS = 64
MAX_BUILT = 100_000  # requests built ahead at most; a duration ends the load before they run out


@dataclass(frozen=True)
class ModelShape:
    """What the workload needs of the model: its vocabulary (random token ids) and positions (lengths)."""

    path: str = ""
    vocab: int | None = None
    positions: int | None = None

    @classmethod
    def of(cls, model_path: str) -> ModelShape:
        config = read_json(Path(model_path) / "config.json") if model_path else None
        if not isinstance(config, dict):
            return cls(model_path)
        vocab = int(config["vocab_size"]) if "vocab_size" in config else None
        return cls(model_path, vocab, max_positions(config))


def request_count(load: RunLoad) -> int:
    """Measured requests: `requests`, else rate x duration (open loop), else DEFAULT_REQUESTS."""
    if load.requests:
        return load.requests
    if load.duration_s and load.rate is not None and math.isfinite(load.rate):
        return max(1, math.ceil(load.rate * load.duration_s))
    if load.duration_s:
        return 1_000_000  # closed loop, or everything at once: the duration ends it
    return DEFAULT_REQUESTS


def _vocab(own: int | None, model: ModelShape, section: str) -> int:
    vocab = own or model.vocab
    if not vocab:
        raise ValueError(f"random token ids need a vocabulary size: scenario.{section}.vocab_size, or a model whose "
                         "config names one")
    return vocab


def _room(model: ModelShape, taken: int) -> int | None:
    """Tokens left in the model's positions after `taken`; None where unknown."""
    return None if model.positions is None else max(1, model.positions - taken)


Prompt = Callable[[list[int]], "str | list[int]"]


def _texts(load: RunLoad, model: ModelShape, vocab: int) -> Prompt:
    """How random token ids become a prompt: as they are (the completions API takes token ids), or for the chat
    API a text the model's tokenizer reads back as that many tokens (tokencount.exact_text)."""
    if load.api != "chat":
        return lambda ids: ids
    found = codec(model.path)
    if found is None:
        raise ValueError(f"api: chat sends {load.input} prompts as text, written with the model's tokenizer "
                         f"files; none readable in {model.path or '(no model path)'}")
    rng = random.Random(f"{load.seed}:text")
    return lambda ids: exact_text(found, ids, lambda: rng.randrange(vocab))


def _chat_planned(load: RunLoad, model: ModelShape, built: list[Request]) -> list[Request]:
    """Chat prompts' planned tokens: the user message through the plain template, where the model has no chat
    template of its own (distinfer's server and vLLM render that one); unknown (None) under the model's own. (A
    prompt file's prompts are never counted ahead.)"""
    if load.api != "chat" or load.input not in ("synthetic", "shared_prefix", "sharegpt"):
        return built
    count = token_counter(model.path)
    if count is None or has_chat_template(Path(model.path)):
        return [replace(r, input_tokens=None) for r in built]
    planned = count([plain_template([{"role": "user", "content": str(r.prompt)}]) for r in built])
    return [replace(r, input_tokens=n) for r, n in zip(built, planned, strict=True)]


def _synthetic(load: RunLoad, model: ModelShape, total: int, rng: random.Random) -> list[Request]:
    spec = load.synthetic
    assert spec is not None
    vocab = _vocab(spec.vocab_size, model, "synthetic")
    text = _texts(load, model, vocab)
    out = []
    for index in range(total):
        output = draw_length(spec.output_tokens, rng, _room(model, 1))
        prompt = [rng.randrange(vocab) for _ in range(draw_length(spec.input_tokens, rng, _room(model, output)))]
        out.append(Request(index, f"synthetic-{index}", text(prompt), output, load.ignore_eos,
                           input_tokens=len(prompt)))
    return out


def _shared_prefix(load: RunLoad, model: ModelShape, total: int, rng: random.Random) -> list[Request]:
    spec = load.shared_prefix
    assert spec is not None
    vocab = _vocab(spec.vocab_size, model, "shared_prefix")
    text = _texts(load, model, vocab)
    prefixes = [[rng.randrange(vocab) for _ in range(draw_length(spec.prefix_tokens, rng, _room(model, 2)))]
                for _ in range(spec.groups)]
    written = [text(prefix) for prefix in prefixes]  # one text per group: its requests' prompts open byte-identical
    out = []
    for index in range(total):
        group = index % spec.groups
        prefix = prefixes[group]
        output = draw_length(spec.output_tokens, rng, _room(model, len(prefix) + 1))
        suffix = [rng.randrange(vocab)
                  for _ in range(draw_length(spec.suffix_tokens, rng, _room(model, len(prefix) + output)))]
        out.append(Request(index, f"group{group}-{index}", written[group] + text(suffix), output, load.ignore_eos,
                           input_tokens=len(prefix) + len(suffix), group=group))
    return out


def sharegpt_exchanges(load: RunLoad, model: ModelShape) -> list[tuple[str, str, int, int]]:
    """(id, prompt, input tokens, output tokens) of the file's exchanges within the length limits (and the
    model's positions), in file order. WorkloadFileError for a malformed file; ValueError where none is left."""
    spec = load.sharegpt
    assert spec is not None
    exchanges = read_sharegpt(Path(spec.file))
    prompt_count, answer_count = token_counter(model.path), token_counter(model.path, special_tokens=False)
    if prompt_count is None or answer_count is None:
        raise ValueError(f"a ShareGPT workload counts tokens with the model's tokenizer files; none readable in "
                         f"{model.path or '(no model path)'}")
    inputs = prompt_count([e.question for e in exchanges])
    outputs = answer_count([e.answer for e in exchanges])
    kept = []
    for exchange, n_in, n_out in zip(exchanges, inputs, outputs, strict=True):
        if not (spec.min_input_tokens <= n_in <= (spec.max_input_tokens or n_in)
                and spec.min_output_tokens <= n_out <= (spec.max_output_tokens or n_out)):
            continue
        if model.positions is not None and n_in + n_out > model.positions:
            continue
        kept.append((exchange.id, exchange.question, n_in, n_out))
    if not kept:
        raise ValueError(f"{spec.file}: no conversation within the length limits (input {spec.min_input_tokens}.."
                         f"{spec.max_input_tokens or 'any'}, output {spec.min_output_tokens}.."
                         f"{spec.max_output_tokens or 'any'} tokens, the model's {model.positions} positions)")
    return kept


def _sharegpt(load: RunLoad, model: ModelShape, total: int, rng: random.Random) -> list[Request]:
    kept = sharegpt_exchanges(load, model)
    order = list(range(len(kept)))
    rng.shuffle(order)  # a seeded sample of the file, not its first records
    out = []
    for index in range(total):
        ident, prompt, n_in, n_out = kept[order[index % len(order)]]
        out.append(Request(index, ident, prompt, n_out, load.ignore_eos, input_tokens=n_in))
    return out


def _prompt_file(load: RunLoad, prompts_file: Path, max_new_tokens: int, total: int) -> list[Request]:
    prompts = load_prompts(prompts_file)
    return [Request(index, prompts[index % len(prompts)].id, prompts[index % len(prompts)].prompt, max_new_tokens,
                    load.ignore_eos) for index in range(total)]


def trace_requests(load: RunLoad, model: ModelShape) -> list[Request]:
    """The trace's requests on its schedule (`at_s`: its times x the run's time scale), as many as `requests` and
    `duration_s` allow, after `warmup_requests` copies of its first ones, unscheduled. Mooncake's hash ids give
    the prompt's blocks: a block is the same token ids wherever its id appears; tokens past the blocks are the
    request's own."""
    spec = load.trace
    assert spec is not None
    records = read_trace(Path(spec.file), spec.format)
    scale = float(load.value)
    if load.requests:
        records = records[: load.requests]
    if load.duration_s is not None:
        records = [r for r in records if r.at_s * scale <= load.duration_s]
    vocab = _vocab(spec.vocab_size, model, "trace")
    rng = random.Random(load.seed)
    blocks: dict[int, list[int]] = {}

    def block(hash_id: int) -> list[int]:
        if hash_id not in blocks:
            own = random.Random(f"{load.seed}:{hash_id}")
            blocks[hash_id] = [own.randrange(vocab) for _ in range(spec.block_tokens)]
        return blocks[hash_id]

    built = []
    for record in records[: MAX_BUILT]:
        needed = -(-record.input_tokens // spec.block_tokens)  # only the blocks the prompt's length reaches
        ids = [t for h in record.hash_ids[:needed] for t in block(h)][: record.input_tokens]
        ids += [rng.randrange(vocab) for _ in range(record.input_tokens - len(ids))]
        built.append((f"trace-line{record.line}", ids, record.output_tokens, record.at_s * scale))
    warm = [Request(i, f"warmup-{ident}", ids, out, load.ignore_eos, warmup=True, input_tokens=len(ids))
            for i, (ident, ids, out, _) in enumerate(built[: load.warmup_requests])]
    return warm + [Request(len(warm) + i, ident, ids, out, load.ignore_eos, input_tokens=len(ids), at_s=at)
                   for i, (ident, ids, out, at) in enumerate(built)]


BUILDERS = {"synthetic": _synthetic, "shared_prefix": _shared_prefix, "sharegpt": _sharegpt}


def build_requests(load: RunLoad, prompts_file: Path, max_new_tokens: int, model: ModelShape) -> list[Request]:
    """The warm-up requests, then the measured ones, indexed in sending order."""
    if load.input == "trace":
        return trace_requests(load, model)
    total = load.warmup_requests + min(request_count(load), MAX_BUILT)
    if load.input == "sessions":
        raise ValueError("multi-turn sessions are built by serving/sessions.py: their prompts grow with the answers")
    if load.input == "prompts":
        built = _prompt_file(load, prompts_file, max_new_tokens, total)
    else:
        built = _chat_planned(load, model, BUILDERS[load.input](load, model, total, random.Random(load.seed)))
    return [replace(r, warmup=True) if r.index < load.warmup_requests else r for r in built]


__all__ = ["DEFAULT_REQUESTS", "ModelShape", "WorkloadFileError", "build_requests", "request_count",
           "sharegpt_exchanges"]
