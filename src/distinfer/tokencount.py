"""Token counts of texts with a model's own tokenizer files, read by the tokenizer libraries themselves
(`tokenizers` for tokenizer.json, `sentencepiece` for tokenizer.model, as the slow Llama tokenizer reads it), never
through transformers or torch: planning, prediction and the load generator stay light. `exact_text` turns token
ids into a text that the tokenizer reads back as that many tokens (synthetic prompts through the chat API)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distinfer.bundle import read_json
from distinfer.models.profiles import profile_for

Counter = Callable[[list[str]], list[int]]


@dataclass(frozen=True)
class Codec:
    """A model's tokenizer as text <-> token ids, without special tokens; `added` the special tokens it adds to a
    prompt (BOS)."""

    encode: Callable[[list[str]], list[list[int]]]
    decode: Callable[[list[int]], str]
    added: int


@functools.lru_cache(maxsize=32)
def codec(model_path: str) -> Codec | None:
    """The model's tokenizer files read by `sentencepiece` (tokenizer.model, where the slow Llama tokenizer is
    the model's) or `tokenizers` (tokenizer.json); None where neither library can read them."""
    folder = Path(model_path) if model_path else None
    if folder is None or not (folder / "config.json").is_file():
        return None
    settings = read_json(folder / "tokenizer_config.json") or {}
    try:
        if (folder / "tokenizer.model").is_file() and (profile_for(folder).tokenizer_use_fast is False
                                                       or not (folder / "tokenizer.json").is_file()):
            import sentencepiece

            model = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
            added = int(settings.get("add_bos_token", True)) + int(settings.get("add_eos_token", False))
            return Codec(lambda texts: model.encode(texts), lambda ids: model.decode(ids), added)
        if (folder / "tokenizer.json").is_file():
            import tokenizers

            fast = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
            return Codec(lambda texts: [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)],
                         lambda ids: fast.decode(ids, skip_special_tokens=False),
                         len(fast.encode("", add_special_tokens=True).ids))  # its post-processor's BOS, EOS
    except (ImportError, OSError, ValueError, RuntimeError, TypeError):  # no library, or files it cannot read
        return None
    return None


def token_counter(model_path: str, special_tokens: bool = True) -> Counter | None:
    """A function from texts to their token counts, with the special tokens the tokenizer adds to a prompt (BOS)
    or without them (an answer's tokens); None where neither library can read the model's files."""
    found = codec(model_path)
    if found is None:
        return None
    added = found.added if special_tokens else 0
    return lambda texts: [len(ids) + added for ids in found.encode(texts)]


def exact_text(found: Codec, ids: list[int], pad: Callable[[], int], tries: int = 12) -> str:
    """A text of the tokens `ids` that the tokenizer reads back as exactly len(ids) tokens where it can: decoded
    text re-tokenizes to other lengths (merges across token boundaries), so the re-read ids are cut or padded
    with `pad()` ids and decoded again until the count holds (or `tries` run out: the nearest is kept)."""
    target, text = len(ids), found.decode(ids)
    for _ in range(tries):
        got = found.encode([text])[0]
        if len(got) == target:
            return text
        got = got[:target] if len(got) > target else got + [pad() for _ in range(target - len(got))]
        text = found.decode(got)
    return text


def has_chat_template(model: Path) -> bool:
    """The model's files carry a chat template (tokenizer_config.json's, or chat_template.jinja beside it)."""
    if (model / "chat_template.jinja").is_file() or (model / "chat_template.json").is_file():
        return True
    settings = read_json(model / "tokenizer_config.json")
    return bool(isinstance(settings, dict) and settings.get("chat_template"))
