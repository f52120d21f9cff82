"""Prompt sets: JSONL files with one {"id": ..., "prompt": ...} object per line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CHARS_PER_TOKEN = 3  # where no tokenizer is at hand (planning on a login node): a generous estimate of tokens


class PromptFileError(ValueError):
    """A bad prompt file; the message names the file and line."""


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str


def load_prompts(path: Path) -> list[Prompt]:
    """Read and check a prompt file: valid JSON per line, string ids unique, prompts non-empty."""
    prompts: list[Prompt] = []
    seen: set[str] = set()
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptFileError(f"{path}: cannot read: {exc}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or "id" not in record or "prompt" not in record:
            raise PromptFileError(f'{path}: line {number}: expected an object with "id" and "prompt"')
        if not isinstance(record["prompt"], str) or not record["prompt"].strip():
            raise PromptFileError(f'{path}: line {number}: "prompt" must be a non-empty string')
        pid = str(record["id"])
        if pid in seen:
            raise PromptFileError(f'{path}: line {number}: duplicate id "{pid}"')
        seen.add(pid)
        prompts.append(Prompt(id=pid, prompt=record["prompt"]))
    if not prompts:
        raise PromptFileError(f"{path}: no prompts (expected one JSON object per line)")
    return prompts


def read_paragraphs(path: Path) -> list[str]:
    """The paragraphs of a text file (separated by blank lines), whitespace normalised."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptFileError(f"{path}: cannot read: {exc}") from None
    paragraphs = [" ".join(block.split()) for block in text.split("\n\n") if block.strip()]
    if not paragraphs:
        raise PromptFileError(f"{path}: no text (expected paragraphs separated by blank lines)")
    return paragraphs


def build_prompt_set(texts: Path, context_tokens: int, count: int, question: str) -> list[Prompt]:
    """`count` long-context prompts: prompt i is paragraphs i, i+1, ... (wrapping) until it has at least
    `context_tokens` words (so at least that many tokens; the worker cuts it to exactly that from the left),
    then the question. Deterministic: the same file gives the same prompts."""
    paragraphs = read_paragraphs(texts)
    prompts = []
    for i in range(count):
        chosen, words, j = [], 0, i
        while words < context_tokens:
            paragraph = paragraphs[j % len(paragraphs)]
            chosen.append(paragraph)
            words += len(paragraph.split())
            j += 1
        prompts.append(Prompt(id=f"ctx{context_tokens}-{i}", prompt="\n\n".join(chosen) + "\n\n" + question))
    return prompts


def take_prompts(prompts: list[Prompt], number: int) -> list[Prompt]:
    """The first `number` prompts, going round the list again (ids suffixed #2, #3, ...) when it is shorter."""
    out = []
    for i in range(number):
        base = prompts[i % len(prompts)]
        lap = i // len(prompts)
        out.append(base if lap == 0 else Prompt(id=f"{base.id}#{lap + 1}", prompt=base.prompt))
    return out
