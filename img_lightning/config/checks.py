"""Value checks on loaded configs: a negative lr or a zero batch size is refused at load time, with
the key named, instead of failing deep inside training (``ZeroDivisionError``) or training wrong.

A schema declares ``CHECKS``: ``{dotted key: check}``; :func:`validate` runs them once the config
is merged (``load_config`` does it). A ``*`` in a key stands for every entry of a list
(``scorers.*.max_new_tokens``), so options of list entries get the same checks as every other key.
A check returns ``None`` when the value is fine, else what is wrong with it ("must be > 0").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Optional

from omegaconf import OmegaConf

from .node import as_node

Check = Callable[[Any], Optional[str]]


def positive(value: Any) -> Optional[str]:
    return None if value > 0 else "must be > 0"


def non_negative(value: Any) -> Optional[str]:
    return None if value >= 0 else "must be >= 0"


def at_least(low: int) -> Check:
    return lambda value: None if value >= low else f"must be >= {low}"


def between(low: float, high: float, high_open: bool = False) -> Check:
    def check(value: Any) -> Optional[str]:
        ok = low <= value < high if high_open else low <= value <= high
        return None if ok else f"must be in [{low}, {high}{')' if high_open else ']'}"

    return check


def one_of(*choices: Any) -> Check:
    return lambda value: None if value in choices else f"must be one of {list(choices)}"


def optional(check: Check) -> Check:
    """``None`` is allowed (the key is unset); anything else must pass ``check``."""
    return lambda value: None if value is None else check(value)


def betas(value: Any) -> Optional[str]:
    """Adam's (beta1, beta2)."""
    ok = len(value) == 2 and all(0 <= b < 1 for b in value)
    return None if ok else "must be two numbers in [0, 1)"


def steps_limit(value: Any) -> Optional[str]:
    """Lightning's max_steps / max_epochs: -1 for "no limit", else a positive count."""
    return None if value == -1 or value >= 1 else "must be -1 (no limit) or >= 1"


def expand(cfg: object, pattern: str) -> list[str]:
    """The dotted keys ``pattern`` names: a ``*`` part stands for every entry of a list (its index)
    or mapping at that place (``scorers.*.batch_size`` -> ``scorers.0.batch_size``, ...)."""
    root = as_node(cfg)
    keys = [""]
    for part in pattern.split("."):
        if part != "*":
            keys = [f"{k}.{part}" if k else part for k in keys]
            continue
        expanded = []
        for k in keys:
            node = OmegaConf.select(root, k) if k else root
            if OmegaConf.is_list(node):
                expanded += [f"{k}.{i}" for i in range(len(node))]
            elif OmegaConf.is_dict(node):
                expanded += [f"{k}.{name!s}" for name in node]
        keys = expanded
    return keys


def problems(cfg: object, checks: Mapping[str, Check]) -> list[str]:
    """``key=value: what is wrong`` for every failing check (unset ``???`` and ``None`` entries of
    lists are skipped)."""
    found = []
    for pattern, check in checks.items():
        for key in expand(cfg, pattern):
            if _missing(cfg, key):
                continue
            value = OmegaConf.select(as_node(cfg), key)
            message = check(value)
            if message:
                found.append(f"{key}={value!r}: {message}")
    return found


def _missing(cfg: object, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(as_node(cfg), parent) if parent else cfg
    return node is None or OmegaConf.is_missing(node, leaf)
