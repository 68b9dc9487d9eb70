"""What differs between two resolved configs, as dotted keys (``optim.lr: 0.0001 -> 0.001``).

Used when a training run resumes: its saved ``config.yaml`` is the record of what the run is, so a
resume that would silently train with another cache, batch size or learning rate must be refused
(the optimizer state would keep the old lr while the record claimed the new one).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

_ABSENT = object()


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are leaf values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved value, current value)}`` for every key whose value differs."""
    old, new = flatten(saved), flatten(current)
    changes = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a != b:
            changes[key] = (None if a is _ABSENT else a, None if b is _ABSENT else b)
    return changes


def describe_changes(changes: Mapping[str, tuple[Any, Any]], keys: Iterable[str] | None = None) -> str:
    """One ``key: old -> new`` per line (for error messages and logs)."""
    wanted = sorted(changes) if keys is None else sorted(keys)
    return "\n".join(f"  {k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in wanted)
