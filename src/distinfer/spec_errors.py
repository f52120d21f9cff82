"""Validation errors as one line that names the file, the field and what is allowed (with a close match for a
misspelt field)."""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path

from pydantic import BaseModel

from distinfer.engines import SELECTABLE
from distinfer.spec_schema import PATTERN_HELP, Experiment


def _section(annotation: object) -> type[BaseModel] | None:
    """The model class of a nested section's annotation (`X` or `X | None`), else None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _all_field_names(model: type[BaseModel] | None = None) -> set[str]:
    """Every field name of the experiment schema, at any depth."""
    model = model or Experiment
    names = set(model.model_fields)
    for field in model.model_fields.values():
        section = _section(field.annotation)
        if section is not None:
            names |= _all_field_names(section)
    return names


# What a sweep field accepts, said once for every error on it.
SWEEP_HINTS = {
    "batch_size": "an integer >= 1 or a list of them",
    "parallel.pp": "an integer >= 1 or a list of them",
    "parallel.microbatches": "an integer >= 1 or a list of them",
    "parallel.engine": f"{' | '.join(SELECTABLE)}, or a list of them",
    "parallel.tp": "an integer >= 1 or a list of them",
    "parallel.layers": "auto, a list of layer counts per stage, or a list of such lists",
    "model.dtype": "float32 | float16 | bfloat16 | int8, or a list of them",
    "prompts": "a JSONL file path, or {texts: FILE, context_tokens: N or [N, ...], count: N}",
    "prompts.context_tokens": "an integer >= 1 or a list of them",
    "scenario.rate": "a number > 0 or inf, or a list of them (requests per second)",
    "scenario.concurrency": "an integer >= 1 or a list of them (users)",
}


def _field_name(loc: tuple) -> str:
    """Dotted field path without pydantic's union-member tags ('constrained-int', 'list[...]')."""
    names = _all_field_names()
    parts = [f"[{p}]" if isinstance(p, int) else str(p) for p in loc if isinstance(p, int) or p in names]
    return ".".join(parts).replace(".[", "[") or "(top level)"


def _allowed_fields(loc: tuple) -> list[str]:
    model: type[BaseModel] = Experiment
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        section = _section(field.annotation) if field is not None else None
        if section is None:
            return []
        model = section
    return list(model.model_fields)


def format_error(path: Path, error: dict) -> str:
    loc = tuple(error["loc"])
    field = _field_name(loc)
    if error["type"] == "extra_forbidden":
        field = ".".join(str(p) for p in loc)
        allowed = _allowed_fields(loc)
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        return f"{path}: unknown field '{field}'{suggestion}; allowed here: {', '.join(allowed)}"
    if error["type"] == "missing":
        return f"{path}: field '{field}' is required"
    if error["type"] == "string_pattern_mismatch":
        pattern = error.get("ctx", {}).get("pattern", "")
        help_text = PATTERN_HELP.get(pattern, f"must match {pattern}")
        return f"{path}: field '{field}': {help_text} (got {error.get('input')!r})"
    base = re.sub(r"\[\d+\]", "", field)
    allowed = f"; allowed: {SWEEP_HINTS[base]}" if base in SWEEP_HINTS else ""
    message = str(error["msg"]).removeprefix("Value error, ")  # a check of ours: its own words
    return f"{path}: field '{field}': {message} (got {error.get('input')!r}){allowed}"


