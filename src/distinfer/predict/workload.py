"""The prompt lengths a run's batches have, in tokens: with the model's tokenizer files where they can be read, else
estimated from the text (prompts.CHARS_PER_TOKEN, as the memory plan does; the prediction lists it)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from distinfer.bundle import read_json
from distinfer.models.profiles import profile_for
from distinfer.prompts import CHARS_PER_TOKEN, build_prompt_set, load_prompts, take_prompts

Counter = Callable[[list[str]], list[int]]


@functools.lru_cache(maxsize=32)
def _counter(model_path: str) -> Counter | None:
    """Token counts of texts with the model's own tokenizer files, read by the tokenizer libraries themselves
    (`tokenizers` for tokenizer.json, `sentencepiece` for tokenizer.model, as the slow Llama tokenizer reads
    it), never through transformers or torch: planning and prediction stay light. None where neither can."""
    folder = Path(model_path) if model_path else None
    if folder is None or not (folder / "config.json").is_file():
        return None
    settings = read_json(folder / "tokenizer_config.json") or {}
    try:
        if (folder / "tokenizer.model").is_file() and (profile_for(folder).tokenizer_use_fast is False
                                                       or not (folder / "tokenizer.json").is_file()):
            import sentencepiece

            model = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
            extra = int(settings.get("add_bos_token", True)) + int(settings.get("add_eos_token", False))
            return lambda texts: [len(ids) + extra for ids in model.encode(texts)]
        if (folder / "tokenizer.json").is_file():
            import tokenizers

            fast = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
            return lambda texts: [len(e.ids) for e in fast.encode_batch(texts, add_special_tokens=True)]
    except (ImportError, OSError, ValueError, RuntimeError, TypeError):  # no library, or files it cannot read
        return None
    return None


@functools.lru_cache(maxsize=256)
def _lengths(model_path: str, prompts: str, prompt_set: tuple | None,
             num_prompts: int | None) -> tuple[tuple[int, ...], bool]:
    if prompt_set:
        context, count, question = prompt_set
        chosen = build_prompt_set(Path(prompts), context, count, question)
    else:
        chosen = load_prompts(Path(prompts))
    texts = [p.prompt for p in (take_prompts(chosen, num_prompts) if num_prompts else chosen)]
    counter = _counter(model_path)
    if counter is None:
        return tuple(max(1, len(t) // CHARS_PER_TOKEN) for t in texts), False
    return tuple(counter(texts)), True


def prompt_lengths(run) -> tuple[list[int], bool]:  # noqa: ANN001 - a plan.RunSpec
    """Token counts of the run's prompts in order, and whether a tokenizer counted them."""
    ps = run.prompt_set
    key = (ps["context_tokens"], ps["count"], ps["question"]) if ps else None
    lengths, exact = _lengths(run.model_path, run.prompts, key, run.num_prompts)
    return list(lengths), exact
