"""sha256 of a file, streamed: the one implementation behind every hash the project records (cache
shards, checkpoints, question files, exports, converted weights, evaluated images)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Optional


def file_sha256(path: str | Path, chunk: int = 8 << 20, progress: Optional[Callable[[int], object]] = None) -> str:
    """Hex sha256 of ``path``, read in ``chunk``-byte blocks; ``progress(n)`` after each block."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
            if progress is not None:
                progress(len(block))
    return digest.hexdigest()
