"""Atomic file writes: a reader (or a resumed job) sees the old file or the new one, never half of one.

Everything the project writes that another process may read — manifests, shard indexes, run
configs, reports, exported weights — goes through here. The data is written to a hidden temporary
name in the same directory (same file system, so the final ``rename`` is atomic), flushed to disk,
then renamed over the target. If anything fails on the way (a full disk, a kill signal raised as an
exception) the temporary file is removed and the target is left as it was.

Temporary names are ``.{name}.{pid}.tmp``: hidden from globs like ``shard-*.tar`` and unique per
process.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


def temporary_name(path: Path) -> Path:
    """The hidden temporary sibling that :func:`atomic_path` writes before renaming to ``path``."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces ``path``, on error it is removed.
    The parent directory is created if needed.

    For writers that want a file name (``safetensors.torch.save_file``, ``PIL.Image.save``,
    ``torch.save``)::

        with atomic_path(out / "aligner.safetensors") as tmp:
            save_file(tensors, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write(path: str | Path, data: bytes | str, encoding: str = "utf-8") -> Path:
    """Write ``data`` (bytes, or text in ``encoding``) to ``path`` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding=encoding)
        else:
            tmp.write_bytes(data)
    return path


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 1, sort_keys: bool = True) -> Path:
    """``json.dumps(obj)`` + a trailing newline, written atomically. Keys are sorted by default, so
    the same content always gives the same bytes (caches are compared byte for byte)."""
    return atomic_write(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n")


def append_jsonl(path: str | Path, records: Iterable[Any]) -> Path:
    """Append one JSON line per record and fsync: a line on disk is complete and durable before
    the caller goes on (a kill can cut only the line being written, which readers skip)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def _fsync_file(path: Path) -> None:
    # The rename is only crash-safe if the data reached the disk before it.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_writable(folder: str | Path) -> Path:
    """Create ``folder`` if needed and prove a file can be written in it (a probe, removed at once):
    what a long job checks before hours of work that end in writing there. Raises the ``OSError``
    (read-only file system, permissions, a file in the way) for the caller to name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = temporary_name(folder / ".write-probe")
    with open(probe, "wb"):
        pass
    probe.unlink()
    return folder
