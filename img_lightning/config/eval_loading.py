"""Loading an evaluation config (``img-eval``, ``img-generate``, :class:`~img_lightning.IMGRefiner`).

schema <- YAML files <- ``key=value`` overrides (``scorers.0.path=...`` included), then the
``recipe``: the preprocessing recipe's ``encoders`` block replaces the config's, so inference
features come from the training cache's settings (``encoders.*`` overrides still apply on top).

Applying the recipe moves its path from ``recipe`` to ``recipe_applied``: the resolved config holds
the recipe's encoders already, so a saved ``config.yaml`` re-runs as it is, instead of having its
encoders block (with the local paths it was run with) replaced by the recipe's again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from omegaconf import OmegaConf

from .eval import EvalConfig
from .loading import ConfigError, load_config, missing_keys, missing_message, split_cli_args


def apply_recipe(cfg: EvalConfig, overrides: Sequence[str] = ()) -> EvalConfig:
    """``cfg.encoders`` = the recipe's block (+ the ``encoders.*`` overrides); returns the config."""
    if not cfg.recipe:
        return cfg
    from .preprocess import PreprocessConfig

    recipe = load_config(PreprocessConfig, [cfg.recipe], require_complete=False)
    cfg.encoders = recipe.encoders
    enc_overrides = [o for o in overrides if o.startswith("encoders.")]
    if enc_overrides:
        cfg = cast(EvalConfig, OmegaConf.merge(cfg, OmegaConf.from_dotlist(enc_overrides)))
    cfg.recipe_applied = cfg.recipe
    cfg.recipe = None
    return cfg


def load_eval_config(args: Sequence[str], allow_missing: bool = False) -> EvalConfig:
    """YAML files and ``key=value`` overrides (in any order, as on a command line) -> the resolved
    :class:`~img_lightning.config.eval.EvalConfig`. A key left ``???`` (lists included) is an error
    unless ``allow_missing`` (the checks before a run then report it with every other problem)."""
    files, overrides = split_cli_args(args)
    cfg = apply_recipe(load_config(EvalConfig, files, overrides, require_complete=False), overrides)
    missing = missing_keys(cfg)
    if missing and not allow_missing:
        raise ConfigError(missing_message(cfg, missing))
    return cfg
