"""Scorers for ``img-eval score``: build them from config with :func:`build_scorers`."""

from __future__ import annotations

from typing import Any, Sequence

from . import blip_vqa, clip, complex, hps, spatial  # noqa: F401  (register the kinds)
from .base import REGISTRY, Scorer


def scorer_name(cfg: Any) -> str:
    return cfg.name or cfg.kind


def build_scorers(cfgs: Sequence[Any]) -> dict[str, Scorer]:
    """Build every configured scorer in order (a 3-in-1 scorer uses the ones listed before it)."""
    built: dict[str, Scorer] = {}
    for cfg in cfgs:
        if cfg.kind not in REGISTRY:
            raise ValueError(f"unknown scorer kind '{cfg.kind}'; choose one of {sorted(REGISTRY)}")
        name = scorer_name(cfg)
        if name in built:
            raise ValueError(f"two scorers are named '{name}'; give one of them another `name`")
        built[name] = REGISTRY[cfg.kind](cfg, others=built)
        built[name].name = name
    return built


__all__ = ["Scorer", "build_scorers", "scorer_name", "REGISTRY"]
