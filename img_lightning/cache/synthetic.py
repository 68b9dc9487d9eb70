"""Synthetic caches in the real format, for tests, benchmarks and quick smoke runs.

Winners are a fixed, learnable function of the guidance and the loser features:
``c_w = c_l + a * tanh(mean_t(h) A) + b * tanh(c_l B) + noise``, with ``A``, ``B`` drawn from
``task_seed`` (so a train and a validation cache made with different ``seed`` share one task).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from .format import CACHE_DTYPES, GUIDANCE_DTYPES
from .key import cache_key
from .manifest import Manifest
from .quant import DEFAULT_OUTLIER_CHANNELS, to_storage
from .writer import CacheWriter


def synthetic_recipe(guidance_dim: int, ip_tokens: int, ip_dim: int, task_seed: int, dtype: str,
                     guidance_dtype: Optional[str] = None, outlier_channels: int = DEFAULT_OUTLIER_CHANNELS) -> dict:
    recipe: dict[str, Any] = {
        "synthetic": {"guidance_dim": guidance_dim, "ip_tokens": ip_tokens, "ip_dim": ip_dim, "task_seed": task_seed},
        "dtype": dtype,
    }
    if guidance_dtype not in (None, dtype):  # as in recipe.recipe_of: 16-bit keys unchanged
        recipe["guidance_dtype"] = guidance_dtype
        if guidance_dtype == "float8_e4m3fn":
            recipe["fp8_outlier_channels"] = outlier_channels
    return recipe


def write_synthetic_cache(
    out_dir: str | Path,
    num_pairs: int,
    *,
    guidance_dim: int = 64,
    ip_tokens: int = 16,
    ip_dim: int = 64,
    min_tokens: int = 8,
    max_tokens: int = 24,
    shard_size: int = 64,
    seed: int = 0,
    task_seed: int = 0,
    dtype: str = "float16",
    guidance_dtype: Optional[str] = None,
    outlier_channels: int = DEFAULT_OUTLIER_CHANNELS,
    guidance_weight: float = 0.5,
    loser_weight: float = 0.3,
    noise: float = 0.05,
) -> Manifest:
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(CACHE_DTYPES)}")
    if guidance_dtype is not None and guidance_dtype not in GUIDANCE_DTYPES:
        raise ValueError(f"guidance_dtype must be one of {sorted(GUIDANCE_DTYPES)}")
    task = torch.Generator().manual_seed(task_seed)
    proj_h = torch.randn(guidance_dim, ip_dim, generator=task) / guidance_dim**0.5
    proj_l = torch.randn(ip_dim, ip_dim, generator=task) / ip_dim**0.5
    gen = torch.Generator().manual_seed(seed)
    recipe = synthetic_recipe(guidance_dim, ip_tokens, ip_dim, task_seed, dtype, guidance_dtype, outlier_channels)
    store = CACHE_DTYPES[dtype]
    guidance_store = GUIDANCE_DTYPES[guidance_dtype or dtype]
    with CacheWriter(out_dir, cache_key(recipe), recipe, shard_size=shard_size) as writer:
        for i in range(num_pairs):
            t = int(torch.randint(min_tokens, max_tokens + 1, (1,), generator=gen))
            h = torch.randn(t, guidance_dim, generator=gen)
            lose = torch.randn(ip_tokens, ip_dim, generator=gen)
            win = (
                lose
                + guidance_weight * torch.tanh(h.mean(0) @ proj_h)[None, :]
                + loser_weight * torch.tanh(lose @ proj_l)
                + noise * torch.randn(ip_tokens, ip_dim, generator=gen)
            )
            key = f"s{seed:04d}-{i:07d}"
            meta = {
                "pair_id": key,
                "caption": f"synthetic pair {i}",
                "winner_uid": f"{key}-w",
                "loser_uid": f"{key}-l",
                "winner_index": 0,
                "template_id": i % 100,
                "num_tokens": t,
            }
            stored = to_storage({"guidance": h, "ip_lose": lose, "ip_win": win}, store, guidance_store, key,
                                outlier_channels)
            writer.write(key, stored, meta)
    return Manifest.load(out_dir)
