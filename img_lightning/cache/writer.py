"""Writing cache shards: temporary name while open, renamed only when complete.

A crash mid-shard leaves only a ``.tmp`` file (ignored and overwritten by the next run); a
finished shard always has its index file, which is what makes it count as done.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

import webdataset as wds
from torch import Tensor

from .format import SHARD_PATTERN, TENSOR_KEYS, check_key, encode_sample
from .manifest import (
    Manifest,
    ShardEntry,
    finalize_manifest,
    index_path,
    read_shard_index,
    scan_shard,
    sha256_file,
    write_shard_index,
)

_DTYPE_NAMES = {"torch.float16": "float16", "torch.bfloat16": "bfloat16", "torch.float32": "float32"}


def _tensor_spec(tensors: Mapping[str, Tensor]) -> dict:
    g, ip = tensors["guidance"], tensors["ip_lose"]
    return {
        "guidance": {"dtype": _DTYPE_NAMES.get(str(g.dtype), str(g.dtype)), "dim": int(g.shape[1])},
        "ip": {"dtype": _DTYPE_NAMES.get(str(ip.dtype), str(ip.dtype)), "shape": [int(s) for s in ip.shape]},
    }


def shard_is_complete(shard_path: Path) -> bool:
    """A shard is done when its index exists and the tar has the size the index records."""
    shard_path = Path(shard_path)
    if not shard_path.is_file() or not index_path(shard_path).is_file():
        return False
    try:
        entry, _ = read_shard_index(shard_path)
    except ValueError:
        return False
    return shard_path.stat().st_size == entry.bytes


class ShardWriter:
    """Writes one shard. Use as a context manager; the shard appears only on clean exit."""

    def __init__(self, path: str | Path, cache_key: str) -> None:
        self.path = Path(path)
        self.cache_key = cache_key
        self.tmp_path = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.tmp_path, "wb")
        # Fixed mtime/owner/mode: the same samples always give byte-identical shards.
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0.0, user="img", group="img", mode=0o444)
        self._keys: set[str] = set()
        self.tensors: Optional[dict] = None
        self.entry: Optional[ShardEntry] = None

    def write(self, key: str, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        check_key(key)
        if key in self._keys:
            raise ValueError(f"{self.path}: duplicate sample key {key!r}")
        spec = _tensor_spec(tensors)
        if self.tensors is None:
            self.tensors = spec
        elif spec != self.tensors:
            raise ValueError(f"{self.path}: sample {key!r} has tensors {spec}, shard started with {self.tensors}")
        members = encode_sample({k: tensors[k] for k in TENSOR_KEYS}, meta)
        self._tar.write({"__key__": key, **members})
        self._keys.add(key)

    def __len__(self) -> int:
        return len(self._keys)

    def close(self) -> ShardEntry:
        """Finish the tar, index it, then rename it and write its index (in that order)."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        records = scan_shard(self.tmp_path)
        self.entry = ShardEntry(
            name=self.path.name,
            num_samples=len(records),
            bytes=self.tmp_path.stat().st_size,
            sha256=sha256_file(self.tmp_path),
            cache_key=self.cache_key,
            tensors=self.tensors or {},
        )
        self.tmp_path.replace(self.path)
        write_shard_index(self.path, self.entry, records)
        return self.entry

    def abort(self) -> None:
        try:
            self._tar.close()
            self._file.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class CacheWriter:
    """Sequential writer for a whole cache: fixed-size shards, then the manifest.

    Preprocessing uses :class:`ShardWriter` directly (its shard plan is global and split over
    array tasks); this helper serves synthetic caches, tests and benchmarks.
    """

    def __init__(self, cache_dir: str | Path, cache_key: str, recipe: dict, shard_size: int = 256) -> None:
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        self.cache_dir = Path(cache_dir)
        self.cache_key = cache_key
        self.recipe = recipe
        self.shard_size = shard_size
        self._shard_index = 0
        self._current: Optional[ShardWriter] = None

    def write(self, key: str, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        if self._current is None:
            path = self.cache_dir / SHARD_PATTERN.format(self._shard_index)
            self._current = ShardWriter(path, self.cache_key)
        self._current.write(key, tensors, meta)
        if len(self._current) >= self.shard_size:
            self._current.close()
            self._current = None
            self._shard_index += 1

    def close(self) -> Manifest:
        if self._current is not None:
            self._current.close()
            self._current = None
        return finalize_manifest(self.cache_dir, self.cache_key, self.recipe)

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._current is not None:
            self._current.abort()
