"""Reading an experiment file: YAML without duplicate keys, arbitrary tags, or alias bombs."""

from __future__ import annotations

from pathlib import Path

import yaml

from distinfer.spec_schema import SpecError

MAX_YAML_VALUES = 100_000  # values an experiment file may expand to through aliases (a real one has hundreds)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would keep the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise SpecError(f"field {key!r} is given twice (lines {seen[key] + 1} and "
                                    f"{key_node.start_mark.line + 1}); give each field once")
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(data: object, limit: int) -> int:
    """How many values `data` holds once every alias is expanded, counting shared objects once per use (stops
    counting past `limit`); memoised by identity, so a billion-value alias bomb is measured in microseconds."""
    sizes: dict[int, int] = {}

    def size(value: object) -> int:
        if not isinstance(value, (dict, list)):
            return 1
        key = id(value)
        if key not in sizes:
            sizes[key] = limit + 1  # a cycle counts as too large
            items = list(value.values()) if isinstance(value, dict) else value
            total = 1
            for item in items:
                total += size(item)
                if total > limit:
                    break
            sizes[key] = min(total, limit + 1)
        return sizes[key]

    return size(data)


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"{path}: experiment file not found") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = getattr(exc, "context_mark", None)
        if context is not None and mark is not None and context.line != mark.line:
            opened = (getattr(exc, "context", "") or "block").removeprefix("while parsing ").removeprefix("a ")
            where += f" (in the {opened} opened at line {context.line + 1})"
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{path}: YAML syntax error{where}: {problem}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping of fields (name, model, prompts, ...), got {type(data).__name__}")
    if _expanded_size(data, MAX_YAML_VALUES) > MAX_YAML_VALUES:
        raise SpecError(f"{path}: the file expands to more than {MAX_YAML_VALUES:,} values through YAML aliases "
                        "(&anchor / *alias); write the values out or use fewer aliases")
    return data


