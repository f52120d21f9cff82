"""Timestamped traces to replay, read with the line of every record for error messages.

Two layouts: Mooncake's JSONL (one request per line: `timestamp` in ms, `input_length`, `output_length`, and
`hash_ids`, the ids of the prompt's 512-token blocks: requests with equal ids share those blocks, so a server
with prefix caching can reuse them) and the Azure LLM inference CSV (`TIMESTAMP`, `ContextTokens`,
`GeneratedTokens`). Times are made relative to the first request; they must not go back. Pure: no torch.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from distinfer.scenario import MAX_LENGTH
from distinfer.serving.sharegpt import WorkloadFileError, read_workload_file

FORMATS = ("mooncake", "azure")


@dataclass(frozen=True)
class TraceRecord:
    line: int
    at_s: float  # seconds after the trace's first request
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()


def trace_format(path: Path, given: str | None) -> str:
    return given or ("azure" if path.suffix.lower() == ".csv" else "mooncake")


def _length(value: object, where: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LENGTH:
        raise WorkloadFileError(f"{where}: field '{field}': a token count of 1 to {MAX_LENGTH} (got {value!r})")
    return value


def _mooncake(path: Path, text: str) -> list[tuple[int, float, int, int, tuple[int, ...]]]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise WorkloadFileError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise WorkloadFileError(f"{where}: each line is an object with timestamp, input_length, output_length")
        stamp = record.get("timestamp")
        if isinstance(stamp, bool) or not isinstance(stamp, (int, float)) or not math.isfinite(stamp) or stamp < 0:
            raise WorkloadFileError(f"{where}: field 'timestamp': milliseconds, 0 or more (got {stamp!r})")
        hashes = record.get("hash_ids", [])
        if not isinstance(hashes, list) or any(isinstance(h, bool) or not isinstance(h, int) for h in hashes):
            raise WorkloadFileError(f"{where}: field 'hash_ids': a list of integers (got {json.dumps(hashes)[:60]})")
        rows.append((number, stamp / 1000, _length(record.get("input_length"), where, "input_length"),
                     _length(record.get("output_length"), where, "output_length"), tuple(hashes)))
    return rows


def _azure_time(value: str, where: str) -> float:
    text = (value or "").strip()
    head, dot, fraction = text.partition(".")
    try:  # Azure's traces write seven fractional digits; datetime takes six
        return datetime.fromisoformat(head + (dot + fraction[:6] if dot else "")).timestamp()
    except ValueError:
        raise WorkloadFileError(f"{where}: field 'TIMESTAMP': a date and time such as 2023-11-16 18:15:46.680590 "
                                f"(got {value!r})") from None


def _azure(path: Path, text: str) -> list[tuple[int, float, int, int, tuple[int, ...]]]:
    reader = csv.DictReader(text.splitlines())
    missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or [])
    if missing:
        raise WorkloadFileError(f"{path}: line 1: the header lacks {', '.join(sorted(missing))} (Azure's LLM "
                                "inference trace: TIMESTAMP,ContextTokens,GeneratedTokens)")
    rows = []
    for number, row in enumerate(reader, 2):
        where = f"{path}: line {number}"
        counts = []
        for field in ("ContextTokens", "GeneratedTokens"):
            try:
                counts.append(int(row[field]))
            except (TypeError, ValueError):
                raise WorkloadFileError(f"{where}: field '{field}': an integer (got {row[field]!r})") from None
        rows.append((number, _azure_time(row["TIMESTAMP"], where), _length(counts[0], where, "ContextTokens"),
                     _length(counts[1], where, "GeneratedTokens"), ()))
    return rows


def read_trace(path: Path, fmt: str | None = None) -> list[TraceRecord]:
    """The trace's requests in order, times from its first; WorkloadFileError naming file, line and field."""
    text = read_workload_file(path)
    layout = trace_format(path, fmt)
    rows = _azure(path, text) if layout == "azure" else _mooncake(path, text)
    if not rows:
        raise WorkloadFileError(f"{path}: no requests in the trace")
    field = "TIMESTAMP" if layout == "azure" else "timestamp"
    for (_, before, *_), (line, at, *_) in zip(rows, rows[1:]):
        if at < before:
            raise WorkloadFileError(f"{path}: line {line}: field '{field}': goes back ({at - rows[0][1]:.3f} s after "
                                    f"the start, the request before at {before - rows[0][1]:.3f} s)")
    first = rows[0][1]
    return [TraceRecord(line, at - first, n_in, n_out, hashes) for line, at, n_in, n_out, hashes in rows]
