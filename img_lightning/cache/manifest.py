"""Per-shard index files and the cache manifest.

Each shard gets ``shard-NNNNNN.index.json`` (its manifest entry plus byte offsets of every member),
written only after the shard is complete, so concurrent SLURM array tasks never touch a shared
file. ``manifest.json`` is assembled from those entries by :func:`finalize_manifest`.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..atomic import atomic_write_json
from ..hashing import file_sha256
from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_SUFFIX,
    MANIFEST_NAME,
    META_EXT,
    TENSOR_EXT,
    CacheFormatError,
    format_version,
    parse_safetensors_header,
)


@dataclass(frozen=True)
class SampleRecord:
    """Byte layout of one sample inside its shard (offsets are absolute in the tar file)."""

    key: str
    offset: int  # start of the .safetensors member's data
    size: int
    header_len: int  # 8 + safetensors JSON header length
    meta_offset: int
    meta_size: int
    num_tokens: int

    def to_row(self) -> list:
        return [self.key, self.offset, self.size, self.header_len, self.meta_offset, self.meta_size, self.num_tokens]

    @classmethod
    def from_row(cls, row: list) -> SampleRecord:
        return cls(str(row[0]), *(int(v) for v in row[1:7]))


@dataclass
class ShardEntry:
    name: str
    num_samples: int
    bytes: int
    sha256: str
    cache_key: str
    # {"guidance": {"dtype", "dim"[, "scale": {"dtype", "per"}]}, "ip": {"dtype", "shape"}}
    tensors: dict = field(default_factory=dict)


def index_path(shard_path: Path) -> Path:
    return shard_path.with_name(shard_path.name[: -len(".tar")] + INDEX_SUFFIX)


sha256_file = file_sha256  # the cache's name for it (reader, verify)


def scan_shard(path: Path) -> list[SampleRecord]:
    """Read a shard's tar headers and return the offsets of every sample.

    Raises :class:`CacheFormatError` naming the shard on truncation, a bad header or a sample
    without both members.
    """
    path = Path(path)
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, ext = info.name.partition(".")
                if key not in members:
                    members[key] = {}
                    order.append(key)
                members[key][ext] = info
    except (tarfile.TarError, EOFError, OSError) as err:
        raise CacheFormatError(f"{path}: unreadable tar ({err})") from None
    size = path.stat().st_size
    records = []
    with open(path, "rb") as f:
        for key in order:
            parts = members[key]
            if TENSOR_EXT not in parts or META_EXT not in parts:
                raise CacheFormatError(f"{path}: sample {key!r} lacks a .{TENSOR_EXT} or .{META_EXT} member")
            t, m = parts[TENSOR_EXT], parts[META_EXT]
            if max(t.offset_data + t.size, m.offset_data + m.size) > size:
                raise CacheFormatError(f"{path}: sample {key!r} runs past the end of the file (truncated)")
            f.seek(t.offset_data)
            head = f.read(min(t.size, 1 << 16))
            data_start, specs = parse_safetensors_header(head)
            guidance = specs.get("guidance")
            if guidance is None or len(guidance.shape) != 2:
                raise CacheFormatError(f"{path}: sample {key!r} has no [T, D] guidance tensor")
            records.append(
                SampleRecord(key, t.offset_data, t.size, data_start, m.offset_data, m.size, guidance.shape[0])
            )
    return records


def write_shard_index(shard_path: Path, entry: ShardEntry, records: list[SampleRecord]) -> Path:
    out = index_path(shard_path)
    atomic_write_json(out, {**asdict(entry), "samples": [r.to_row() for r in records]})
    return out


def read_shard_index(shard_path: Path) -> tuple[ShardEntry, list[SampleRecord]]:
    path = index_path(Path(shard_path))
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        records = [SampleRecord.from_row(r) for r in raw.pop("samples")]
        entry = ShardEntry(**raw)
    except FileNotFoundError:
        raise CacheFormatError(f"{path}: index file missing (the shard was never completed)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CacheFormatError(f"{path}: malformed index ({err})") from None
    if len(records) != entry.num_samples:
        raise CacheFormatError(f"{path}: lists {len(records)} samples but says num_samples={entry.num_samples}")
    return entry, records


@dataclass
class Manifest:
    cache_key: str
    recipe: dict
    tensors: dict
    shards: list[ShardEntry]
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_json(self) -> dict:
        return {
            "format": self.format,
            "version": self.version,
            "cache_key": self.cache_key,
            "recipe": self.recipe,
            "tensors": self.tensors,
            "num_samples": self.num_samples,
            "num_bytes": self.num_bytes,
            "shards": [asdict(s) for s in self.shards],
        }

    @classmethod
    def load(cls, cache_dir: str | Path) -> Manifest:
        path = Path(cache_dir) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {cache_dir} is not a finished feature cache. Run "
                f"`img-preprocess CONFIG data.output={cache_dir}` (or `img-preprocess manifest {cache_dir}` "
                f"once all array tasks are done)."
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if raw.get("format") != FORMAT_NAME:
                raise CacheFormatError(f"{path}: not an {FORMAT_NAME} manifest (format={raw.get('format')!r})")
            if int(raw.get("version", -1)) > FORMAT_VERSION:
                raise CacheFormatError(
                    f"{path}: cache format version {raw['version']} is newer than this img-lightning "
                    f"({FORMAT_VERSION}); upgrade img-lightning"
                )
            return cls(
                cache_key=raw["cache_key"],
                recipe=raw.get("recipe", {}),
                tensors=raw.get("tensors", {}),
                shards=[ShardEntry(**s) for s in raw["shards"]],
                version=int(raw["version"]),
            )
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CacheFormatError(f"{path}: malformed manifest ({err})") from None


def finalize_manifest(
    cache_dir: str | Path, cache_key: str, recipe: dict, expected_shards: Optional[Iterable[str]] = None
) -> Manifest:
    """Assemble ``manifest.json`` from the per-shard index files (the last step of preprocessing).

    ``expected_shards``: shard names the plan calls for; a missing one is an error, so a partial
    array run never yields a manifest that silently lacks data.
    """
    cache_dir = Path(cache_dir)
    entries = []
    for idx_file in sorted(cache_dir.glob("shard-*" + INDEX_SUFFIX)):
        entry, _ = read_shard_index(cache_dir / (idx_file.name[: -len(INDEX_SUFFIX)] + ".tar"))
        if entry.cache_key != cache_key:
            raise CacheFormatError(
                f"{idx_file}: written with cache key {entry.cache_key}, expected {cache_key}; the output "
                f"directory mixes two recipes: use a fresh data.output"
            )
        entries.append(entry)
    if expected_shards is not None:
        missing = sorted(set(expected_shards) - {e.name for e in entries})
        if missing:
            raise CacheFormatError(
                f"{cache_dir}: {len(missing)} planned shards are not finished (first: {missing[0]}); "
                f"re-run the preprocessing tasks that own them"
            )
    tensors: dict = {}
    for e in entries:
        if e.tensors and tensors and e.tensors != tensors:
            raise CacheFormatError(f"{cache_dir}/{e.name}: tensor shapes {e.tensors} differ from {tensors}")
        tensors = tensors or e.tensors
    manifest = Manifest(cache_key=cache_key, recipe=recipe, tensors=tensors, shards=entries,
                        version=format_version(tensors))
    atomic_write_json(cache_dir / MANIFEST_NAME, manifest.to_json())
    return manifest
