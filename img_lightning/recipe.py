"""The recipe of a feature cache: everything that decides *what* the cached features are, and its key.

A preprocessing config (:class:`~img_lightning.config.preprocess.PreprocessConfig`) splits into
identity and location/speed; :func:`recipe_of` keeps the identity (encoder ids and revisions,
layer, dtype, the question set, image preprocessing, the data filter, the stored dtype) and
:func:`cache_key_of` hashes it. Preprocessing writes the key into every shard's manifest entry;
training recomputes it from the recipe it names and refuses a cache with another key.

It sits above the encoders (a question file enters the recipe through its sha256, read by the
encoders' question module) and above the cache (whose :func:`~img_lightning.cache.key.cache_key`
does the hashing), so the config schemas below both stay free of them.
"""

from __future__ import annotations

from typing import Any

from .config.encoders import EncodersConfig, IPEncoderConfig, MLLMConfig
from .config.preprocess import GuidanceDtype, PreprocessConfig, guidance_dtype_name
from .encoders.export_manifest import export_recipe
from .encoders.questions import question_recipe


def _plain(value: Any) -> Any:
    return getattr(value, "value", value)  # Enum members enter the recipe as their value


def recipe_of_encoders(cfg: EncodersConfig) -> dict:
    """The identity part of an encoders config (goes into the cache key). The question file is
    read here: its sha256 is what identifies it, so moving the file keeps the key. A local MLLM
    folder is a location, not an identity, except when it is a finetuned export
    (``img-finetune-mllm``): then the sha256 of its manifest (which lists the sha256 of every weight
    file) joins the key, so another export behind the same config gets another cache."""
    mllm = {k: _plain(getattr(cfg.mllm, k)) for k in MLLMConfig.recipe_fields}
    mllm.update(question_recipe(cfg.mllm))
    mllm.update(export_recipe(cfg.mllm))
    ip = {k: _plain(getattr(cfg.ip, k)) for k in IPEncoderConfig.recipe_fields}
    if getattr(cfg.ip, "autocast", False):  # only when set: every cache made without it keeps its key
        ip["autocast"] = True
    return {"mllm": mllm, "ip": ip}


def recipe_of(cfg: PreprocessConfig) -> dict:
    """Everything that decides *what* the cached features are, nothing about where or how fast."""
    return {
        "encoders": recipe_of_encoders(cfg.encoders),
        "data": {
            "dataset": cfg.data.dataset,
            "split": cfg.data.split,
            "drop_ties": cfg.data.drop_ties,
            "require_different": cfg.data.require_different,
            "limit": cfg.data.limit,
            "drop_empty_captions": cfg.data.drop_empty_captions,
        },
        "dtype": _plain(cfg.cache.dtype),
        **_guidance_storage(cfg),
    }


def _guidance_storage(cfg: PreprocessConfig) -> dict:
    """Recipe entries of the guidance storage, only when it differs from ``cache.dtype``, so every
    16-bit cache keeps the key it always had."""
    name = guidance_dtype_name(cfg.cache)
    if name == _plain(cfg.cache.dtype):
        return {}
    out: dict[str, Any] = {"guidance_dtype": name}
    if name == GuidanceDtype.float8_e4m3fn.value:
        out["fp8_outlier_channels"] = int(cfg.cache.fp8_outlier_channels)
    return out


def cache_key_of(cfg: PreprocessConfig) -> str:
    """The cache key of a preprocessing config (``sha256`` of :func:`recipe_of`, 16 hex digits)."""
    from .cache.key import cache_key  # the cache package pulls in torch; computing a recipe need not

    return cache_key(recipe_of(cfg))
