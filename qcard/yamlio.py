"""Safe YAML loading that rejects duplicate keys and remembers where each key was written."""
from __future__ import annotations

from typing import Any, Dict, Tuple

import yaml

from .errors import ConfigError

KeyPath = Tuple[Any, ...]


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader (no arbitrary objects) that refuses duplicate mapping keys."""

    def construct_mapping(self, node, deep=False):
        seen: Dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"duplicate key '{key}' at line {line} (first given at line {seen[key]}); each key may appear once")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _lines(node, path: KeyPath, out: Dict[KeyPath, int]) -> None:
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[path + (key,)] = key_node.start_mark.line + 1
            _lines(value_node, path + (key,), out)
            out[path + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _lines(item, path + (i,), out)


def load_yaml(text: str, source: str = "<string>") -> Tuple[Any, Dict[KeyPath, int]]:
    """Parse YAML text; return (data, {key path: line number}). Errors name the source and line."""
    try:
        loader = _StrictLoader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}: YAML syntax error{where}: {problem}") from None
    lines: Dict[KeyPath, int] = {}
    if node is not None:
        _lines(node, (), lines)
    return data, lines


def format_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"
