"""Token counts of texts with a model's own tokenizer files, read by the tokenizer libraries themselves
(`tokenizers` for tokenizer.json, `sentencepiece` for tokenizer.model, as the slow Llama tokenizer reads it), never
through transformers or torch: planning, prediction and the load generator stay light."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from distinfer.bundle import read_json
from distinfer.models.profiles import profile_for

Counter = Callable[[list[str]], list[int]]


@functools.lru_cache(maxsize=32)
def token_counter(model_path: str, special_tokens: bool = True) -> Counter | None:
    """A function from texts to their token counts, with the special tokens the tokenizer adds to a prompt (BOS)
    or without them (an answer's tokens); None where neither library can read the model's files."""
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
            extra = extra if special_tokens else 0
            return lambda texts: [len(ids) + extra for ids in model.encode(texts)]
        if (folder / "tokenizer.json").is_file():
            import tokenizers

            fast = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
            return lambda texts: [len(e.ids) for e in fast.encode_batch(texts, add_special_tokens=special_tokens)]
    except (ImportError, OSError, ValueError, RuntimeError, TypeError):  # no library, or files it cannot read
        return None
    return None
