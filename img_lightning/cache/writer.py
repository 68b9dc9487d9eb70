"""Writing cache shards: temporary name while open, renamed only when complete.

A crash mid-shard leaves only a ``.tmp`` file (ignored and overwritten by the next run); a
finished shard always has its index file, which is what makes it count as done.

Shards are plain POSIX tar written with the standard library's :mod:`tarfile` (the format every
WebDataset reader streams). The byte offset of every member, which the index needs for random
access, is counted by the sink the tar is written through: ``TarFile.addfile`` writes a member's
header, data and padding straight to it, so the sink's size after the call is the member's end.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Optional, cast

import torch
from torch import Tensor

from .format import (
    FP8_DTYPE,
    META_EXT,
    OUTLIER_KEY,
    QUANT_KEYS,
    SCALE_KEY,
    SHARD_PATTERN,
    TENSOR_EXT,
    TENSOR_KEYS,
    check_key,
    encode_sample,
    member_name,
)
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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensor_spec(tensors: Mapping[str, Tensor]) -> dict:
    """The manifest's ``tensors`` entry: what every sample of the cache must look like."""
    g, ip = tensors["guidance"], tensors["ip_lose"]
    guidance = {"dtype": _dtype_name(g.dtype), "dim": int(g.shape[1])}
    if g.dtype == FP8_DTYPE:
        guidance["scale"] = {"dtype": _dtype_name(tensors[SCALE_KEY].dtype), "per": "token"}
        outliers = tensors.get(OUTLIER_KEY)
        guidance["outliers"] = {"channels": 0 if outliers is None else int(outliers.shape[1]),
                                "dtype": None if outliers is None else _dtype_name(outliers.dtype)}
    return {"guidance": guidance, "ip": {"dtype": _dtype_name(ip.dtype), "shape": [int(s) for s in ip.shape]}}


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
    """Sequential sink that hashes and counts what passes through (the tar is written front to
    back, never seeking), so a finished shard's sha256, size and member offsets cost no second
    read of the file."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size

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
        # In mode "w" tarfile only writes, tells and flushes: what the hashing sink does.
        self._tar = tarfile.open(fileobj=cast(IO[bytes], self._sink), mode="w", format=tarfile.PAX_FORMAT,
                                 encoding="utf-8")
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
        members = encode_sample({k: tensors[k] for k in (*TENSOR_KEYS, *QUANT_KEYS) if k in tensors}, meta)
        meta_bytes, payload = members[META_EXT], members[TENSOR_EXT]
        meta_offset = self._add(member_name(key, META_EXT), meta_bytes)
        offset = self._add(member_name(key, TENSOR_EXT), payload)
        (header_len,) = struct.unpack_from("<Q", payload, 0)
        self._records.append(
            SampleRecord(
                key=key,
                offset=offset,
                size=len(payload),
                header_len=8 + header_len,
                meta_offset=meta_offset,
                meta_size=len(meta_bytes),
                num_tokens=int(tensors["guidance"].shape[0]),
            )
        )
        self._keys.add(key)

    def _add(self, name: str, data: bytes) -> int:
        """Append one member; returns the byte offset of its data in the shard."""
        # Fixed mtime/owner/mode: the same samples always give byte-identical shards.
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "img", "img"
        self._tar.addfile(info, io.BytesIO(data))
        return self._sink.size - _padded(len(data))

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

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
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

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
        elif self._current is not None:
            self._current.abort()
