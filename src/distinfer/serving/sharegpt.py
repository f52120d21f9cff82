"""Conversation files in the ShareGPT layout, read with the line of every record for error messages.

The layout: a JSON list of records, each with `conversations`, a list of turns `{"from": ..., "value": text}`
where `from` is `human` (or `user`) for a question and `gpt` (or `assistant`, `chatgpt`, `bard`, `bing`) for an
answer; `system` turns are kept apart. A request is a record's first human turn with the answer after it: its
output length is the answer's token count, as vLLM's sharegpt dataset takes it. Records without such a pair are
skipped (the peers' files hold many); a record that is not of the layout at all is an error naming the file,
its line and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

QUESTION = {"human", "user"}
ANSWER = {"gpt", "assistant", "chatgpt", "bard", "bing", "model"}
ROLES = QUESTION | ANSWER | {"system"}


class WorkloadFileError(ValueError):
    """A workload file that cannot be used: the message names the file, the line and the field."""


@dataclass(frozen=True)
class Exchange:
    """A record's first question and the answer to it."""

    id: str
    line: int
    question: str
    answer: str


@dataclass(frozen=True)
class Conversation:
    """A record's questions, each with the answer that followed it, in order (a question left unanswered ends
    it)."""

    id: str
    line: int
    exchanges: tuple[tuple[str, str], ...]


def _records(path: Path, text: str) -> list[tuple[int, object]]:
    """The elements of the top-level JSON list with the line each starts on."""
    decoder, i, line, size = json.JSONDecoder(), 0, 1, len(text)

    def skip(i: int) -> int:
        while i < size and text[i] in " \t\r\n":
            i += 1
        return i

    i = skip(i)
    if i >= size or text[i] != "[":
        raise WorkloadFileError(f"{path}: line 1: a ShareGPT file is a JSON list of records with 'conversations'")
    i, out, counted = i + 1, [], 0
    while True:
        i = skip(i)
        if i < size and text[i] == "]":
            return out
        line += text.count("\n", counted, i)
        counted = i
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise WorkloadFileError(f"{path}: line {exc.lineno}: not JSON ({exc.msg})") from None
        out.append((line, value))
        i = skip(end)
        if i < size and text[i] == ",":
            i += 1
        elif i >= size or text[i] != "]":
            lineno = line + text.count("\n", counted, min(i, size))
            raise WorkloadFileError(f"{path}: line {lineno}: expected ',' or ']' between records")


def read_workload_file(path: Path) -> str:
    """A workload file's text (UTF-8); WorkloadFileError where it is missing or unreadable."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WorkloadFileError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkloadFileError(f"{path}: cannot read: {exc}") from None


def read_conversations(path: Path) -> list[Conversation]:
    """Every record's question-answer pairs, in file order; WorkloadFileError on a malformed file."""
    text = read_workload_file(path)
    conversations = []
    for index, (line, record) in enumerate(_records(path, text)):
        where = f"{path}: line {line}"
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise WorkloadFileError(f"{where}: field 'conversations': each record needs a list of turns")
        turns = record["conversations"]
        for turn in turns:
            if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
                raise WorkloadFileError(f"{where}: field 'conversations': each turn is {{from: human|gpt|system, "
                                        f"value: text}}; got {json.dumps(turn)[:80]}")
        talk = [t for t in turns if t["from"] != "system"]
        pairs, i = [], 0
        while i + 1 < len(talk):
            if talk[i]["from"] in QUESTION and talk[i + 1]["from"] in ANSWER:
                pairs.append((talk[i]["value"], talk[i + 1]["value"]))
                i += 2
            elif pairs:  # the conversation's order breaks: its pairs so far
                break
            else:
                i += 1
        conversations.append(Conversation(str(record.get("id", index)), line, tuple(pairs)))
    return conversations


def read_sharegpt(path: Path) -> list[Exchange]:
    """Every record's first question and its answer, in file order; WorkloadFileError on a malformed file."""
    return [Exchange(c.id, c.line, *c.exchanges[0]) for c in read_conversations(path) if c.exchanges]
