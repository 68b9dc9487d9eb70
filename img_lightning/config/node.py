"""Configs typed as their schema, handed to OmegaConf as what they are at run time.

:func:`~img_lightning.config.loading.load_config` builds a ``DictConfig`` from a schema dataclass
and types it as that dataclass, so code reads ``cfg.data.batch_size`` with its type known. OmegaConf's
own functions (``select``, ``update``, ``is_missing``) take the ``DictConfig``: :func:`as_node` is
that view, for the helpers that work on a config of any schema.
"""

from __future__ import annotations

from typing import cast

from omegaconf import DictConfig


def as_node(cfg: object) -> DictConfig:
    """``cfg`` (a config from ``load_config``, typed as its schema) as the ``DictConfig`` it is."""
    return cast(DictConfig, cfg)
