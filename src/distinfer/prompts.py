"""Prompt sets: JSONL files with one {"id": ..., "prompt": ...} object per line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


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
