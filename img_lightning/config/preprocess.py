"""Typed schema of ``img-preprocess`` configs (``configs/preprocess/*.yaml``).

It lives in the library (not in ``preprocessing/``) because training needs it too: a training
config names the preprocessing recipe its cache must come from, and the cache key is computed from
that recipe by :func:`cache_key_of`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..cache.key import cache_key
from .encoders import EncodersConfig, recipe_of_encoders


@dataclass
class PreprocessDataConfig:
    input: str = "???"  # Pick-a-Pic parquet file, directory or glob
    output: str = "???"  # cache directory
    dataset: str = "yuvalkirstain/pickapic_v2"  # identity of the source (cache key)
    split: str = "train"  # identity of the source (cache key)
    drop_ties: bool = True  # cache key
    require_different: bool = False  # keep only `are_different` pairs (cache key)
    limit: Optional[int] = None  # keep at most this many pairs (cache key: it changes the data)


@dataclass
class CacheLayoutConfig:
    dtype: str = "float16"  # stored tensor dtype: "float16" | "bfloat16" (cache key)
    shard_size: int = 256  # pairs per shard (layout only)
    seed: int = 0  # seed of the global pair -> shard permutation (layout only)


@dataclass
class PreprocessConfig:
    data: PreprocessDataConfig = field(default_factory=PreprocessDataConfig)
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    cache: CacheLayoutConfig = field(default_factory=CacheLayoutConfig)


def recipe_of(cfg) -> dict:
    """Everything that decides *what* the cached features are, nothing about where or how fast."""
    return {
        "encoders": recipe_of_encoders(cfg.encoders),
        "data": {
            "dataset": cfg.data.dataset,
            "split": cfg.data.split,
            "drop_ties": cfg.data.drop_ties,
            "require_different": cfg.data.require_different,
            "limit": cfg.data.limit,
        },
        "dtype": cfg.cache.dtype,
    }


def cache_key_of(cfg) -> str:
    return cache_key(recipe_of(cfg))
