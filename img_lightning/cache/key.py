"""Cache keys: a hash of the extraction recipe only.

Two caches with the same key hold interchangeable features (same encoders, revisions, dtype, layer,
templates, image preprocessing and dataset filter). Local paths, batch sizes, devices and the shard
layout are *not* part of the recipe: they change where and how fast features are made, not what
they are.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

KEY_LENGTH = 16


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def cache_key(recipe: Mapping[str, Any]) -> str:
    """``sha256(canonical JSON of the recipe)``, first 16 hex digits."""
    return hashlib.sha256(canonical_json(dict(recipe)).encode("ascii")).hexdigest()[:KEY_LENGTH]
