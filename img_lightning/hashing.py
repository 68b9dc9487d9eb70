"""sha256 of a file, streamed: the one implementation behind every hash the project records (cache
shards, checkpoints, question files, exports, converted weights, evaluated images).

:func:`file_sha256_once` remembers a file's hash for the life of the process, per version of the
file (path, size, mtime, ctime, inode: any write changes the ctime), so a check that several stages
of one run make (a model's weights compared with its manifest) reads the bytes once.
:func:`files_sha256` hashes several files at once in threads (``hashlib`` releases the GIL on
large blocks): a 13B model's half-dozen weight shards cost the time of the largest, not the sum.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

_ONCE: dict[tuple, str] = {}
_ONCE_LOCK = threading.Lock()


def file_sha256(path: str | Path, chunk: int = 8 << 20, progress: Optional[Callable[[int], object]] = None) -> str:
    """Hex sha256 of ``path``, read in ``chunk``-byte blocks; ``progress(n)`` after each block."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
            if progress is not None:
                progress(len(block))
    return digest.hexdigest()


def _version(path: Path) -> tuple:
    st = os.stat(path)
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def file_sha256_once(path: str | Path) -> str:
    """:func:`file_sha256`, computed once per process for each version of the file."""
    key = _version(Path(path))
    with _ONCE_LOCK:
        known = _ONCE.get(key)
    if known is None:
        known = file_sha256(path)
        with _ONCE_LOCK:
            _ONCE[key] = known
    return known


def files_sha256(paths: Iterable[str | Path], workers: int = 8) -> dict[Path, str]:
    """``{path: sha256}`` of several files, hashed in parallel threads (each once per process)."""
    files = [Path(p) for p in paths]
    if len(files) <= 1:
        return {p: file_sha256_once(p) for p in files}
    with ThreadPoolExecutor(max_workers=min(workers, len(files)), thread_name_prefix="sha256") as pool:
        return dict(zip(files, pool.map(file_sha256_once, files), strict=True))
