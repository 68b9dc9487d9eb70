"""Typed schema of ``img-preprocess`` configs (``configs/preprocess/*.yaml``).

It lives in the library (not in ``preprocessing/``) because training needs it too: a training
config names the preprocessing recipe its cache must come from, and the cache key is computed from
that recipe by :func:`img_lightning.recipe.cache_key_of`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .choices import Choice
from .encoders import EncodersConfig


class StoreDtype(Choice):
    """16-bit storage dtypes (IP tokens, and guidance unless ``guidance_dtype`` says otherwise)."""

    float16 = "float16"
    bfloat16 = "bfloat16"


class Shuffle(Choice):
    pairs = "pairs"
    row_groups = "row_groups"


class Overlap(Choice):
    auto = "auto"
    thread = "thread"
    inline = "inline"


class GuidanceDtype(Choice):
    """Storage of the MLLM guidance, ~98 % of a cache's bytes (see docs/cache-format.md)."""

    float16 = "float16"
    bfloat16 = "bfloat16"
    float8_e4m3fn = "float8_e4m3fn"  # 8-bit with one float32 scale per token: half the bytes


@dataclass
class PreprocessDataConfig:
    input: str = "???"  # Pick-a-Pic parquet file, directory or glob
    output: str = "???"  # cache directory
    dataset: str = "yuvalkirstain/pickapic_v2"  # identity of the source (cache key)
    split: str = "train"  # identity of the source (cache key)
    drop_ties: bool = True  # cache key
    require_different: bool = False  # keep only `are_different` pairs (cache key)
    limit: Optional[int] = None  # keep at most this many pairs (cache key: it changes the data)
    # Pairs with an empty (or whitespace-only) caption have nothing to align to: dropped and counted
    # by default (cache key).
    drop_empty_captions: bool = True


@dataclass
class CacheLayoutConfig:
    dtype: StoreDtype = StoreDtype.float16  # stored tensor dtype (cache key)
    # Guidance storage (cache key); null: the same as `dtype`. float8_e4m3fn halves the bytes per
    # pair (disk, loader and host-to-device traffic) for a rounding error of up to 6 % per stored
    # value; what that does to the aligner: docs/cache-format.md "8-bit guidance", benchmarks/fp8_fidelity.py.
    guidance_dtype: Optional[GuidanceDtype] = None
    # With float8 guidance: the channels of each sample kept at `dtype` (the largest ones, where
    # LLM "massive activations" live; 8 cost ~0.3 % of the bytes). Cache key when float8.
    fp8_outlier_channels: int = 8
    shard_size: int = 256  # pairs per shard (layout only)
    seed: int = 0  # seed of the global pair -> shard permutation (layout only)
    # How the seeded global permutation is drawn (layout only; the features are the same):
    #   "pairs":      uniform over all pairs. Every shard draws from every parquet row group, so
    #                 each pair costs a row-group read: fine for small inputs, ~100x read
    #                 amplification on full Pick-a-Pic (row groups of ~100 pairs).
    #   "row_groups": permute the parquet row groups, then the pairs inside each one. Every row
    #                 group is read once; what the full-dataset configs use.
    shuffle: Shuffle = Shuffle.pairs


@dataclass
class PreprocessRunConfig:
    """Throughput knobs (never part of the cache key)."""

    decode_threads: int = 4  # JPEG decoding threads feeding the encoders (1: decode inline)
    prefetch_batches: int = 4  # prepared batches queued ahead of the encoders
    # "auto": prepare the next batches in a background thread when an encoder runs on a GPU,
    # inline on CPU-only runs; "thread" / "inline" force either.
    overlap: Overlap = Overlap.auto
    # torch intra-op threads while extracting (None: torch's default). On a shared or small CPU
    # box use 1: with tiny models, OpenMP threads waiting on a descheduled sibling are ~10x slower.
    torch_threads: Optional[int] = None
    row_group_cache: int = 8  # parquet row groups kept in memory (reused by neighbouring pairs)


@dataclass
class PreprocessConfig:
    data: PreprocessDataConfig = field(default_factory=PreprocessDataConfig)
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    cache: CacheLayoutConfig = field(default_factory=CacheLayoutConfig)
    run: PreprocessRunConfig = field(default_factory=PreprocessRunConfig)


def guidance_dtype_name(cache_cfg: CacheLayoutConfig) -> str:
    """The effective guidance storage dtype of a ``cache`` config block, e.g. ``"float8_e4m3fn"``."""
    g = cache_cfg.guidance_dtype
    return g.value if g is not None else cache_cfg.dtype.value
