"""``img-preprocess verify DIR``: check every shard of a cache, byte by byte, in one read.

Per shard: present, size and sha256 as the manifest says (the hash is computed while the tar is
parsed, so each byte is read once), index file consistent, cache key, sample count, keys unique
(across the whole cache), both members present, tensor names/dtypes/shapes as the manifest says,
``guidance`` length equal to the recorded ``num_tokens``, finite values, required metadata. For
8-bit guidance also: ``guidance_scale`` present, float32, one per token, finite and > 0; no float8
NaN code in ``guidance``; the outlier channels as the manifest says (count, dtype, ``[T, K]``) at
distinct, increasing indices below the guidance width.
Problems are collected, not raised: the report lists every one with its shard and sample.
"""

from __future__ import annotations

import hashlib
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Optional, cast

import torch

from img_lightning.cache.finite import has_nonfinite, scales_ok
from img_lightning.cache.format import (
    CACHE_DTYPES,
    FP8_DTYPE,
    GUIDANCE_DTYPES,
    INDEX_DTYPE,
    INDEX_SUFFIX,
    META_EXT,
    OUTLIER_INDEX_KEY,
    OUTLIER_KEY,
    QUANT_KEYS,
    REQUIRED_META,
    SCALE_DTYPE,
    SCALE_KEY,
    TENSOR_EXT,
    TENSOR_KEYS,
    CacheFormatError,
    decode_meta,
    decode_tensors,
    format_version,
    split_member_name,
)
from img_lightning.cache.manifest import Manifest, ShardEntry, read_shard_index

from .plan import PLAN_NAME, load_plan_document

MAX_PROBLEMS_PER_SHARD = 20


@dataclass
class ShardCheck:
    name: str
    samples: int = 0
    bytes: int = 0
    keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    root: Path
    cache_key: Optional[str]
    shards: list[ShardCheck]
    problems: list[str]  # cache-level and per-shard problems, each naming its file
    notes: list[str] = field(default_factory=list)  # harmless findings (shown, not failing)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def render(self) -> str:
        head = (f"{self.root}: {len(self.shards)} shards, {self.num_samples} samples, "
                f"{self.num_bytes / 1e9:.3f} GB, cache key {self.cache_key}")
        notes = [f"  note: {n}" for n in self.notes]
        if self.ok:
            return "\n".join([head, "OK: every shard verified", *notes])
        lines = [head, f"FAILED: {len(self.problems)} problem(s)"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines + notes)


class _HashingReader:
    """File wrapper that hashes every byte ``tarfile`` reads (streaming mode reads sequentially)."""

    def __init__(self, f) -> None:
        self.f = f
        self.h = hashlib.sha256()
        self.n = 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.h.update(data)
        self.n += len(data)
        return data

    def drain(self) -> None:
        while self.read(8 << 20):
            pass


def _check_sample(name: str, key: str, payload: bytes, meta_bytes: bytes, spec: dict, out: ShardCheck) -> None:
    where = f"{name}: sample {key!r}"
    try:
        tensors = decode_tensors(bytearray(payload))
        meta = decode_meta(meta_bytes)
    except CacheFormatError as err:
        out.problems.append(f"{where}: {err}")
        return
    missing = [k for k in TENSOR_KEYS if k not in tensors]
    if missing:
        out.problems.append(f"{where}: missing tensors {missing}")
        return
    g_dtype = GUIDANCE_DTYPES.get(spec.get("guidance", {}).get("dtype", ""))
    ip_dtype = CACHE_DTYPES.get(spec.get("ip", {}).get("dtype", ""))
    g, lose, win = tensors["guidance"], tensors["ip_lose"], tensors["ip_win"]
    if g_dtype is not None and g.dtype != g_dtype:
        out.problems.append(f"{where}: guidance dtype {g.dtype}, manifest says {g_dtype}")
    _check_scale(where, g, tensors.get(SCALE_KEY), out)
    _check_outliers(where, g, tensors, spec.get("guidance", {}).get("outliers", {}), out)
    extra = sorted(set(tensors) - set(TENSOR_KEYS) - set(QUANT_KEYS))
    if extra:
        out.problems.append(f"{where}: unexpected tensors {extra}")
    if g.ndim != 2 or g.shape[1] != spec.get("guidance", {}).get("dim", g.shape[-1]):
        dim = spec.get("guidance", {}).get("dim")
        out.problems.append(f"{where}: guidance shape {tuple(g.shape)}, manifest dim {dim}")
    ip_shape = tuple(spec.get("ip", {}).get("shape", lose.shape))
    for label, t in (("ip_lose", lose), ("ip_win", win)):
        if tuple(t.shape) != ip_shape:
            out.problems.append(f"{where}: {label} shape {tuple(t.shape)}, manifest says {ip_shape}")
        if ip_dtype is not None and t.dtype != ip_dtype:
            out.problems.append(f"{where}: {label} dtype {t.dtype}, manifest says {ip_dtype}")
    for label, t in tensors.items():
        if t.is_floating_point() and has_nonfinite(t):
            out.problems.append(f"{where}: {label} has NaN/Inf values")
    lacking = [k for k in REQUIRED_META if k not in meta]
    if lacking:
        out.problems.append(f"{where}: metadata lacks {lacking}")
    elif int(meta["num_tokens"]) != g.shape[0]:
        out.problems.append(f"{where}: num_tokens {meta['num_tokens']} != guidance length {g.shape[0]}")


def _check_scale(where: str, guidance: torch.Tensor, scale: Optional[torch.Tensor], out: ShardCheck) -> None:
    """8-bit guidance needs one finite, positive float32 scale per token; 16-bit guidance none."""
    if guidance.dtype != FP8_DTYPE:
        if scale is not None:
            out.problems.append(f"{where}: {SCALE_KEY} present but guidance is {guidance.dtype}")
        return
    if scale is None:
        out.problems.append(f"{where}: 8-bit guidance without {SCALE_KEY}")
    elif scale.dtype != SCALE_DTYPE or tuple(scale.shape) != guidance.shape[:1]:
        out.problems.append(f"{where}: {SCALE_KEY} is {tuple(scale.shape)} {scale.dtype}, expected "
                            f"({guidance.shape[0]},) {SCALE_DTYPE}")
    elif not scales_ok(scale):
        bad = [i for i, v in enumerate(scale.tolist()) if not 0 < v < float("inf")]
        out.problems.append(f"{where}: {SCALE_KEY} not finite and > 0 at {len(bad)} token(s) (first: {bad[0]})")


def _check_outliers(where: str, guidance: torch.Tensor, tensors: dict, spec: dict, out: ShardCheck) -> None:
    """The 16-bit outlier channels of 8-bit guidance, against the manifest's ``outliers`` entry."""
    index, values = tensors.get(OUTLIER_INDEX_KEY), tensors.get(OUTLIER_KEY)
    k = int(spec.get("channels", 0)) if guidance.dtype == FP8_DTYPE else 0
    if k == 0:
        if index is not None or values is not None:
            out.problems.append(f"{where}: outlier channels present, the manifest lists none")
        return
    if index is None or values is None:
        out.problems.append(f"{where}: {OUTLIER_INDEX_KEY}/{OUTLIER_KEY} missing (manifest: {k} channels)")
        return
    ids = index.tolist() if index.dtype == INDEX_DTYPE and index.ndim == 1 else None
    if ids is None or len(ids) != k or ids != sorted(set(ids)) or not (0 <= ids[0] and ids[-1] < guidance.shape[-1]):
        out.problems.append(f"{where}: {OUTLIER_INDEX_KEY} is not {k} distinct increasing int32 channels "
                            f"below {guidance.shape[-1]}")
    v_dtype = CACHE_DTYPES.get(spec.get("dtype") or "")
    if tuple(values.shape) != (guidance.shape[0], k) or values.dtype != v_dtype:
        out.problems.append(f"{where}: {OUTLIER_KEY} is {tuple(values.shape)} {values.dtype}, expected "
                            f"({guidance.shape[0]}, {k}) {v_dtype}")


def check_shard(root: str, entry: dict, cache_key: str, spec: dict) -> ShardCheck:
    """Verify one shard against its manifest entry (runs in a worker process)."""
    root_p = Path(root)
    name = entry["name"]
    path = root_p / name
    out = ShardCheck(name=name)
    if not path.is_file():
        out.problems.append(f"{name}: file missing")
        return out
    size = path.stat().st_size
    out.bytes = size
    if size != entry["bytes"]:
        out.problems.append(f"{name}: size {size} B, manifest says {entry['bytes']} B (truncated or rewritten)")
    if entry.get("cache_key") != cache_key:
        out.problems.append(f"{name}: manifest entry has cache key {entry.get('cache_key')}, cache has {cache_key}")
    try:
        idx_entry, records = read_shard_index(path)
        if idx_entry.sha256 != entry["sha256"] or idx_entry.num_samples != entry["num_samples"]:
            out.problems.append(f"{name}: index file disagrees with the manifest (sha256/count)")
        if idx_entry.cache_key != cache_key:
            out.problems.append(f"{name}: index file has cache key {idx_entry.cache_key}, cache has {cache_key}")
        index_tokens = {r.key: r.num_tokens for r in records}
    except CacheFormatError as err:
        out.problems.append(str(err))
        index_tokens = {}
    pending: dict[str, dict[str, bytes]] = {}
    with open(path, "rb") as f:
        reader = _HashingReader(f)
        try:
            # Stream mode ("r|") only reads, front to back: what the hashing reader does.
            with tarfile.open(fileobj=cast(IO[bytes], reader), mode="r|") as tar:
                for info in tar:
                    try:  # the writer's member-name rule: a shard written elsewhere is refused
                        key, ext = split_member_name(info.name)
                    except ValueError as err:
                        out.problems.append(f"{name}: {err}")
                        continue
                    if not info.isfile():
                        out.problems.append(f"{name}: member {info.name!r} is not a regular file")
                        continue
                    member = tar.extractfile(info)
                    assert member is not None  # a regular file (checked above)
                    data = member.read()
                    if len(data) != info.size:
                        raise tarfile.ReadError(f"member {info.name} truncated")
                    parts = pending.setdefault(key, {})
                    if ext in parts:
                        out.problems.append(f"{name}: duplicate member {info.name}")
                    parts[ext] = data
                    if TENSOR_EXT in parts and META_EXT in parts:
                        if key in out.keys:
                            out.problems.append(f"{name}: duplicate sample key {key!r}")
                        out.keys.append(key)
                        _check_sample(name, key, parts[TENSOR_EXT], parts[META_EXT], spec, out)
                        if index_tokens and index_tokens.get(key) is None:
                            out.problems.append(f"{name}: sample {key!r} is not in the index file")
                        del pending[key]
                        if len(out.problems) > MAX_PROBLEMS_PER_SHARD:
                            out.problems.append(f"{name}: too many problems, stopped checking this shard")
                            break
        except (tarfile.TarError, EOFError, OSError) as err:
            out.problems.append(f"{name}: unreadable tar ({type(err).__name__}: {err})")
        reader.drain()
    for key in pending:
        out.problems.append(f"{name}: sample {key!r} lacks its .{TENSOR_EXT} or .{META_EXT} member")
    out.samples = len(out.keys)
    digest = reader.h.hexdigest()
    if digest != entry["sha256"]:
        out.problems.append(f"{name}: sha256 {digest[:16]}..., manifest says {entry['sha256'][:16]}... (corrupt)")
    if out.samples != entry["num_samples"]:
        out.problems.append(f"{name}: {out.samples} readable samples, manifest says {entry['num_samples']}")
    return out


def _entries(root: Path) -> tuple[Optional[str], dict, list[dict], list[str]]:
    """(cache key, tensor spec, shard entries, cache-level problems) from the manifest, or from the
    plan and index files when the manifest is not written yet (an array job still running)."""
    problems: list[str] = []
    if (root / "manifest.json").is_file():
        try:
            m = Manifest.load(root)
        except (CacheFormatError, ValueError) as err:
            return None, {}, [], [str(err)]
        entries = [vars(e) if isinstance(e, ShardEntry) else dict(e) for e in m.shards]
        if m.version < format_version(m.tensors):
            problems.append(f"manifest.json: format version {m.version}, but its tensors need version "
                            f"{format_version(m.tensors)} (8-bit guidance); re-run `img-preprocess manifest {root}`")
        if (root / PLAN_NAME).is_file():
            planned = set(load_plan_document(root)["shards"])
            missing = sorted(planned - {e["name"] for e in entries})
            if missing:
                problems.append(f"manifest.json lacks {len(missing)} planned shard(s), first {missing[0]}")
        return m.cache_key, m.tensors, entries, problems
    if not (root / PLAN_NAME).is_file():
        return None, {}, [], [f"{root}: neither manifest.json nor {PLAN_NAME}: not a feature cache"]
    doc = load_plan_document(root)
    problems.append(f"{root}/manifest.json missing: run `img-preprocess manifest {root}` once all tasks finished")
    entries = []
    spec: dict[str, Any] = {}
    for name in doc["shards"]:
        try:
            entry, _ = read_shard_index(root / name)
        except CacheFormatError:
            problems.append(f"{name}: not finished (no index file)")
            continue
        entries.append(vars(entry))
        spec = spec or entry.tensors
    return doc["cache_key"], spec, entries, problems


def verify_cache(root: str | Path, workers: int = 1) -> VerifyReport:
    root = Path(root)
    cache_key, spec, entries, problems = _entries(root)
    notes: list[str] = []
    checks: list[ShardCheck] = []
    if entries:
        args: list[tuple[Any, ...]] = [(str(root), e, cache_key, spec) for e in entries]
        if workers > 1 and len(entries) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                checks = list(pool.map(check_shard, *zip(*args, strict=True)))
        else:
            checks = [check_shard(*a) for a in args]
    seen: dict[str, str] = {}
    for c in checks:
        problems.extend(c.problems)
        for key in c.keys:
            if key in seen and seen[key] != c.name:
                problems.append(f"{c.name}: sample key {key!r} also in {seen[key]}")
            seen.setdefault(key, c.name)
    # A temporary file beside its finished shard is harmless (an interrupted duplicate writer, removed
    # by the next img-preprocess run); one without a finished shard means a task did not complete.
    finished = {e["name"] for e in entries}
    stray = sorted(p.name for p in root.glob(".shard-*.tmp"))
    unfinished = [n for n in stray if not any(n.startswith(f".{name}.") for name in finished)]
    if unfinished:
        problems.append(f"{len(unfinished)} unfinished temporary shard file(s) (first {unfinished[0]}): a task was "
                        f"interrupted; re-run it to complete its shards")
    if len(stray) > len(unfinished):
        notes.append(f"{len(stray) - len(unfinished)} leftover temporary file(s) beside finished shards; the next "
                     f"img-preprocess run on this directory removes them")
    orphans = sorted(p.name[: -len(INDEX_SUFFIX)] for p in root.glob("shard-*" + INDEX_SUFFIX)
                     if p.name[: -len(INDEX_SUFFIX)] + ".tar" not in {e["name"] for e in entries})
    if orphans and (root / "manifest.json").is_file():
        problems.append(f"{len(orphans)} finished shard(s) not in manifest.json (first {orphans[0]}.tar): "
                        f"re-run `img-preprocess manifest {root}`")
    return VerifyReport(root=root, cache_key=cache_key, shards=checks, problems=problems, notes=notes)
