"""Writing cache shards: temporary name while open, renamed only when complete.

A crash mid-shard leaves only a ``.tmp`` file (ignored and overwritten by the next run); a
finished shard always has its index file, which is what makes it count as done.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any, Mapping, Optional

import webdataset as wds
from torch import Tensor

from .format import META_EXT, SHARD_PATTERN, TENSOR_EXT, TENSOR_KEYS, check_key, encode_sample
from .manifest import (
    Manifest,
    SampleRecord,
    ShardEntry,
    finalize_manifest,
    index_path,
    read_shard_index,
    write_shard_index,
)

_BLOCK = 512

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


class _HashingFile:
    """Sequential sink that hashes and counts what passes through (tar streams never seek), so a
    finished shard's sha256 and size cost no second read of the file."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


class ShardWriter:
    """Writes one shard. Use as a context manager; the shard appears only on clean exit."""

    def __init__(self, path: str | Path, cache_key: str) -> None:
        self.path = Path(path)
        self.cache_key = cache_key
        self.tmp_path = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.tmp_path, "wb")
        self._sink = _HashingFile(self._file)
        # Fixed mtime/owner/mode: the same samples always give byte-identical shards.
        self._tar = wds.TarWriter(self._sink, encoder=False, mtime=0.0, user="img", group="img", mode=0o444)
        self._keys: set[str] = set()
        self._records: list[SampleRecord] = []
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
        # Two calls in the order one call would use (sorted extensions), so the member offsets for
        # the index can be read off the tar stream as it goes.
        meta_bytes, payload = members[META_EXT], members[TENSOR_EXT]
        self._tar.write({"__key__": key, META_EXT: meta_bytes})
        meta_end = self._tar.tarstream.offset
        self._tar.write({"__key__": key, TENSOR_EXT: payload})
        tensor_end = self._tar.tarstream.offset
        (header_len,) = struct.unpack_from("<Q", payload, 0)
        self._records.append(
            SampleRecord(
                key=key,
                offset=tensor_end - _padded(len(payload)),
                size=len(payload),
                header_len=8 + header_len,
                meta_offset=meta_end - _padded(len(meta_bytes)),
                meta_size=len(meta_bytes),
                num_tokens=int(tensors["guidance"].shape[0]),
            )
        )
        self._keys.add(key)

    def __len__(self) -> int:
        return len(self._keys)

    def close(self) -> ShardEntry:
        """Finish the tar, then rename it and write its index (in that order)."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.entry = ShardEntry(
            name=self.path.name,
            num_samples=len(self._records),
            bytes=self._sink.size,
            sha256=self._sink.sha256.hexdigest(),
            cache_key=self.cache_key,
            tensors=self.tensors or {},
        )
        self.tmp_path.replace(self.path)
        write_shard_index(self.path, self.entry, self._records)
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
