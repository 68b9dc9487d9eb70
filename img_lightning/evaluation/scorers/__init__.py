"""Scorers for ``img-eval score``: build them from config with :func:`build_scorers`."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence

from omegaconf import OmegaConf

from ...config.eval import ScorerConfig
from ...config.loading import ConfigError, to_container
from ...errors import Problems
from . import aesthetic, blip_vqa, clip, complex, hps, image_reward, mllm_grader, spatial  # noqa: F401  (register the kinds)
from .base import CHECKS, REGISTRY, Scorer

# Keys that only name or select: two scorers equal in everything else share one loaded model.
_NOT_MODEL_KEYS = ("name", "label", "categories")


def scorer_name(cfg: ScorerConfig) -> str:
    return cfg.name or cfg.kind


def _model_key(cfg: ScorerConfig) -> str:
    data = to_container(cfg)
    return json.dumps({k: v for k, v in data.items() if k not in _NOT_MODEL_KEYS}, sort_keys=True, default=str)


def build_scorers(cfgs: Sequence[ScorerConfig]) -> dict[str, Scorer]:
    """Build every configured scorer in order (a 3-in-1 scorer uses the ones listed before it).

    Scorers whose configs differ only in ``name``/``label``/``categories`` (e.g. BLIP-VQA for the
    color, shape and texture columns) share one model.
    """
    built: dict[str, Scorer] = {}
    loaded: dict[str, Scorer] = {}
    for cfg in cfgs:
        if cfg.kind not in REGISTRY:
            raise ConfigError(f"unknown scorer kind '{cfg.kind}'; choose one of {sorted(REGISTRY)}")
        name = scorer_name(cfg)
        if name in built:
            raise ConfigError(f"two scorers are named '{name}'; give one of them another `name`")
        key = _model_key(cfg)
        scorer = copy.copy(loaded[key]) if key in loaded and cfg.kind != "t2i_complex" else \
            REGISTRY[cfg.kind](cfg, others=built)
        loaded.setdefault(key, scorer)
        scorer.name = name
        scorer.label = cfg.label or name
        built[name] = scorer
    return built


def _check_one(cfg: ScorerConfig, key: str, problems: Problems, earlier: list[str]) -> None:
    if cfg.kind not in REGISTRY:
        problems.add(f"{key}.kind: unknown scorer kind '{cfg.kind}'; choose one of {sorted(REGISTRY)}")
        return
    name = scorer_name(cfg)
    if name in earlier:
        problems.add(f"{key}: two scorers are named '{name}'; give one of them another `name`")
    CHECKS[cfg.kind](cfg, key, problems, earlier=list(earlier))


def check_scorers(cfgs: Sequence[ScorerConfig], problems: Problems) -> None:
    """What :func:`build_scorers` would fail on, found without loading weights: every scorer's model,
    processor and checkpoint files and options, recorded in ``problems`` under ``scorers.N``."""
    earlier: list[str] = []
    for i, cfg in enumerate(cfgs):
        problems.check(_check_one, cfg, f"scorers.{i}", problems, earlier)
        if not OmegaConf.is_missing(cfg, "kind"):
            earlier.append(scorer_name(cfg))


_CHECKPOINT_ADVICE = {
    "hps": hps.hps_advice,
    "image_reward": image_reward.image_reward_advice,
    "aesthetic": lambda key: f"it is the predictor's MLP weights: {aesthetic.MLP_SOURCE}",
}


def missing_value_hint(cfgs: Sequence[ScorerConfig], key: str) -> str:
    """For ``scorers.N.checkpoint`` left ``???``: where that kind's released checkpoint is ("" otherwise)."""
    parts = key.split(".")
    if len(parts) != 3 or parts[0] != "scorers" or not parts[1].isdigit() or parts[2] != "checkpoint":
        return ""
    cfg = cfgs[int(parts[1])]
    if OmegaConf.is_missing(cfg, "kind") or cfg.kind not in _CHECKPOINT_ADVICE:
        return ""
    return _CHECKPOINT_ADVICE[cfg.kind](key)


__all__ = ["Scorer", "build_scorers", "check_scorers", "missing_value_hint", "scorer_name", "REGISTRY"]
