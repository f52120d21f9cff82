"""The prompt lengths a run's batches have, in tokens: with the model's tokenizer files where they can be read, else
estimated from the text (prompts.CHARS_PER_TOKEN, as the memory plan does; the prediction lists it)."""

from __future__ import annotations

import functools
from pathlib import Path

from distinfer.prompts import CHARS_PER_TOKEN, build_prompt_set, load_prompts, take_prompts
from distinfer.tokencount import token_counter


@functools.lru_cache(maxsize=256)
def _lengths(model_path: str, prompts: str, prompt_set: tuple | None,
             num_prompts: int | None) -> tuple[tuple[int, ...], bool]:
    if prompt_set:
        context, count, question = prompt_set
        chosen = build_prompt_set(Path(prompts), context, count, question)
    else:
        chosen = load_prompts(Path(prompts))
    texts = [p.prompt for p in (take_prompts(chosen, num_prompts) if num_prompts else chosen)]
    counter = token_counter(model_path)
    if counter is None:
        return tuple(max(1, len(t) // CHARS_PER_TOKEN) for t in texts), False
    return tuple(counter(texts)), True


def prompt_lengths(run) -> tuple[list[int], bool]:  # noqa: ANN001 - a plan.RunSpec
    """Token counts of the run's prompts in order, and whether a tokenizer counted them."""
    ps = run.prompt_set
    key = (ps["context_tokens"], ps["count"], ps["question"]) if ps else None
    lengths, exact = _lengths(run.model_path, run.prompts, key, run.num_prompts)
    return list(lengths), exact
