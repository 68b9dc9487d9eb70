"""Random-access reading of a feature cache, one copy from the page cache into the batch.

:class:`CacheView` is built on every rank from the manifest and the shard index files (cheap: no
tensor bytes are read) and is identical everywhere, which is what lets ranks agree on the sample
space. :class:`BatchReader` reads each sample with one ``preadv`` straight into its rows of the
padded batch (pinned memory when feeding a GPU), so tensor bytes are copied exactly once: kernel
page cache to batch. There is no decode step and no inter-process hand-off (see data/loader.py for
why the loader uses threads rather than worker processes). 8-bit guidance stays 8-bit here: the
batch carries ``guidance`` (float8), ``guidance_scale`` and the 16-bit outlier channels, widened
after the copy to the device (:func:`img_lightning.cache.quant.dequantize_batch`).

Every sample is checked for NaN/Inf right after its read, while its bytes are still in the CPU
cache (:mod:`img_lightning.cache.finite`); a non-finite sample is dropped from its batch and
counted like any other corrupt sample. ``read(check_finite=False)`` leaves that check to the device
(:mod:`img_lightning.data.device_check`), where it is almost free; tar/safetensors headers and the
8-bit outlier channel indices are checked here either way.
"""

from __future__ import annotations

import logging
import math
import os
import tarfile
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .finite import has_nonfinite, scales_ok
from .format import (
    CACHE_DTYPES,
    FP8_DTYPE,
    GUIDANCE_DTYPES,
    INDEX_DTYPE,
    OUTLIER_INDEX_KEY,
    OUTLIER_KEY,
    SCALE_DTYPE,
    SCALE_KEY,
    TENSOR_EXT,
    CacheFormatError,
    TensorSpec,
    parse_safetensors_header,
)
from .manifest import Manifest, SampleRecord, read_shard_index, sha256_file

log = logging.getLogger(__name__)


@dataclass
class SkippedShard:
    name: str
    num_samples: int
    reason: str


@dataclass
class CacheView:
    """The readable samples of one cache, as flat numpy columns (fork-friendly, no per-sample objects)."""

    root: Path
    manifest: Manifest
    shard_paths: list[Path]
    shard_of: np.ndarray  # [S] int32, index into shard_paths
    offset: np.ndarray  # [S] int64, start of the .safetensors payload
    header_len: np.ndarray  # [S] int64
    payload_size: np.ndarray  # [S] int64
    num_tokens: np.ndarray  # [S] int64
    keys: np.ndarray  # [S] bytes (fixed width)
    skipped: list[SkippedShard] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return int(self.shard_of.shape[0])

    @property
    def skipped_samples(self) -> int:
        return sum(s.num_samples for s in self.skipped)

    @property
    def skipped_fraction(self) -> float:
        total = self.manifest.num_samples
        return self.skipped_samples / total if total else 0.0

    @property
    def guidance_dim(self) -> int:
        return int(self.manifest.tensors["guidance"]["dim"])

    @property
    def ip_shape(self) -> tuple[int, int]:
        n, d = self.manifest.tensors["ip"]["shape"]
        return int(n), int(d)

    @property
    def guidance_dtype(self) -> torch.dtype:
        """Stored guidance dtype: float16, bfloat16 or float8_e4m3fn (with per-token scales)."""
        name = self.manifest.tensors["guidance"]["dtype"]
        if name not in GUIDANCE_DTYPES:
            raise CacheFormatError(f"{self.root}: unsupported guidance dtype {name!r}")
        return GUIDANCE_DTYPES[name]

    @property
    def ip_dtype(self) -> torch.dtype:
        name = self.manifest.tensors["ip"]["dtype"]
        if name not in CACHE_DTYPES:
            raise CacheFormatError(f"{self.root}: unsupported IP-token dtype {name!r}")
        return CACHE_DTYPES[name]

    @property
    def quantized(self) -> bool:
        """True when guidance is 8-bit and batches carry ``guidance_scale``."""
        return self.guidance_dtype == FP8_DTYPE

    @property
    def outlier_channels(self) -> int:
        """Channels per sample kept 16-bit beside 8-bit guidance (0: none, or 16-bit guidance)."""
        return int(self.manifest.tensors["guidance"].get("outliers", {}).get("channels", 0)) if self.quantized else 0

    @property
    def outlier_dtype(self) -> Optional[torch.dtype]:
        if not self.outlier_channels:
            return None
        name = self.manifest.tensors["guidance"]["outliers"].get("dtype")
        if name not in CACHE_DTYPES:
            raise CacheFormatError(f"{self.root}: unsupported outlier-channel dtype {name!r}")
        return CACHE_DTYPES[name]

    @classmethod
    def open(cls, root: str | Path, verify_checksums: bool = False) -> CacheView:
        """Load the manifest and every shard index; shards that are missing, truncated or (with
        ``verify_checksums``) corrupt are skipped with a warning and listed in ``skipped``."""
        root = Path(root)
        manifest = Manifest.load(root)
        if not manifest.tensors:
            raise CacheFormatError(f"{root}/manifest.json: no tensor shapes recorded (empty cache?)")
        paths: list[Path] = []
        shard_of: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        keys: list[str] = []
        skipped: list[SkippedShard] = []
        for entry in manifest.shards:
            path = root / entry.name
            reason = _shard_problem(path, entry.bytes, entry.sha256 if verify_checksums else None)
            records: list[SampleRecord] = []
            if reason is None:
                try:
                    _, records = read_shard_index(path)
                except CacheFormatError as err:
                    reason = str(err)
            if reason is not None:
                log.warning("skipping shard %s: %s", path, reason)
                skipped.append(SkippedShard(entry.name, entry.num_samples, reason))
                continue
            sid = len(paths)
            paths.append(path)
            shard_of.append(np.full(len(records), sid, dtype=np.int32))
            cols.append(np.array([[r.offset, r.header_len, r.size, r.num_tokens] for r in records], dtype=np.int64))
            keys.extend(r.key for r in records)
        table = np.concatenate(cols) if cols else np.zeros((0, 4), dtype=np.int64)
        return cls(
            root=root,
            manifest=manifest,
            shard_paths=paths,
            shard_of=np.concatenate(shard_of) if shard_of else np.zeros(0, dtype=np.int32),
            offset=np.ascontiguousarray(table[:, 0]),
            header_len=np.ascontiguousarray(table[:, 1]),
            payload_size=np.ascontiguousarray(table[:, 2]),
            num_tokens=np.ascontiguousarray(table[:, 3]),
            keys=np.array(keys, dtype="S") if keys else np.zeros(0, dtype="S1"),
            skipped=skipped,
        )


def _shard_problem(path: Path, expected_bytes: int, expected_sha: Optional[str]) -> Optional[str]:
    if not path.is_file():
        return "file missing"
    size = path.stat().st_size
    if size != expected_bytes:
        return f"size {size} B differs from the manifest's {expected_bytes} B (truncated or rewritten)"
    if expected_sha is not None and sha256_file(path) != expected_sha:
        return "sha256 differs from the manifest (corrupt)"
    return None


class _Buffer:
    """One pooled block of CPU memory (compared by identity)."""

    __slots__ = ("array",)

    def __init__(self, nbytes: int) -> None:
        self.array = np.empty(max(1, nbytes), dtype=np.uint8)

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)


class BufferPool:
    """Recycles CPU batch memory; the pool owns its buffers and learns when one is free again.

    A fresh multi-megabyte allocation is page-faulted and zeroed by the kernel on first touch, which
    costs about as much as reading the bytes; recycling buffers avoids it. Each batch is carved from
    one pooled buffer through a fresh numpy view handed to ``torch.from_numpy``: the tensors' shared
    storage holds the only reference to that view, so the view is collected exactly when the last
    tensor made from the batch (wherever it went, whatever views were taken of it) is gone, and a
    ``weakref.finalize`` on it hands the buffer back. A batch still in use is never overwritten.
    Pinned (GPU-bound) batches do not use this pool: PyTorch's caching host allocator already
    recycles them after their copies finish.
    """

    _ALIGN = 64

    def __init__(self, max_buffers: int = 16) -> None:
        self.max_buffers = max_buffers
        self._owned = 0  # pooled buffers, idle or in use
        # Appended to by finalizers, which may run in any thread at any allocation (even while this
        # thread holds the lock), so they never take the lock: deque.append is atomic.
        self._idle: deque[_Buffer] = deque()
        self._lock = threading.Lock()

    @property
    def idle(self) -> int:
        return len(self._idle)

    def _take(self, nbytes: int) -> tuple[_Buffer, bool]:
        """A buffer of at least ``nbytes`` and whether it belongs to the pool."""
        with self._lock:
            fitting = [b for b in list(self._idle) if b.nbytes >= nbytes]
            if fitting:
                best = min(fitting, key=lambda b: b.nbytes)
                self._idle.remove(best)
                return best, True
            if self._owned >= self.max_buffers and self._idle:
                # Every idle buffer is too small (longer batches now): retire the smallest one.
                self._idle.remove(min(list(self._idle), key=lambda b: b.nbytes))
                self._owned -= 1
            pooled = self._owned < self.max_buffers
            if pooled:
                self._owned += 1
        return _Buffer(nbytes + nbytes // 8), pooled  # slack for longer batches

    def tensors(self, specs: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> list[Tensor]:
        """Uninitialised tensors of the given shapes/dtypes, carved from one recycled buffer."""
        offsets, nbytes = [], 0
        for shape, dtype in specs:
            nbytes = -(-nbytes // self._ALIGN) * self._ALIGN
            offsets.append(nbytes)
            nbytes += math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        buffer, pooled = self._take(nbytes)
        view = buffer.array[: max(1, nbytes)]
        if pooled:
            weakref.finalize(view, self._idle.append, buffer).atexit = False
        flat = torch.from_numpy(view)
        out = []
        for (shape, dtype), offset in zip(specs, offsets, strict=True):
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            out.append(flat[offset : offset + size].view(dtype).view(shape))
        return out


def _valid_index(index: Tensor, dim: int) -> bool:
    """Outlier channel indices: strictly increasing (so distinct) and within ``[0, dim)``: a bad
    one would make the scatter on the device fail far from here, or write the wrong channel."""
    ids = index.numpy()
    return bool(ids[0] >= 0) and bool(ids[-1] < dim) and bool((ids[1:] > ids[:-1]).all())


def _byte_view(t: Tensor) -> memoryview:
    return t.view(torch.uint8).numpy().data.cast("B")


def _pread_into(fd: int, dests: list[Tensor], offset: int) -> None:
    """Fill ``dests`` (contiguous, in order) from ``offset`` with as few ``preadv`` calls as possible."""
    views = [_byte_view(d) for d in dests if d.numel()]
    while views:
        n = os.preadv(fd, views, offset)
        if n <= 0:
            raise CacheFormatError(f"unexpected end of file at byte {offset}")
        offset += n
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]


class BadSampleLog:
    """Names dropped samples in the log: up to ``MAX_LOGGED_PER_SHARD`` per shard, then one line
    saying the rest are only counted (a corrupt shard must not flood the log)."""

    MAX_LOGGED_PER_SHARD = 10

    def __init__(self, view: CacheView) -> None:
        self.view = view
        self._logged: dict[int, int] = {}

    def report(self, i: int, err: Exception) -> None:
        shard = int(self.view.shard_of[i])
        logged = self._logged.get(shard, 0)
        self._logged[shard] = logged + 1
        if logged > self.MAX_LOGGED_PER_SHARD:
            return
        key, path = self.view.keys[i].decode(), self.view.shard_paths[shard]
        if logged == self.MAX_LOGGED_PER_SHARD:
            log.warning("more bad samples in %s: counted, no longer logged; run `img-preprocess verify %s`",
                        path, self.view.root)
            return
        log.warning("dropping bad sample %s in %s: %s (run `img-preprocess verify %s`)", key, path, err,
                    self.view.root)


def nonfinite_error(names: Sequence[str]) -> CacheFormatError:
    """The error a sample with NaN/Inf in the tensors ``names`` is reported with (reader or device)."""
    return CacheFormatError(f"non-finite values in {', '.join(sorted(names))}")


class BatchReader:
    """Reads batches of samples by index into padded tensors (one copy per tensor byte)."""

    def __init__(self, view: CacheView, max_open: int = 64, pool: Optional[BufferPool] = None) -> None:
        self.view = view
        self.pool = pool
        self.max_open = max_open
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._bad_log = BadSampleLog(view)
        self.guidance_dtype = view.guidance_dtype
        self.ip_dtype = view.ip_dtype
        self.quantized = view.quantized
        self.outliers, self.outlier_dtype = view.outlier_channels, view.outlier_dtype
        self.guidance_dim = view.guidance_dim
        self.ip_shape = view.ip_shape

    def _fd(self, shard: int) -> int:
        fd = self._fds.pop(shard, None)
        if fd is None:
            fd = os.open(self.view.shard_paths[shard], os.O_RDONLY)
            while len(self._fds) >= self.max_open:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[shard] = fd
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:  # file descriptors are per process; close what we opened
        try:
            self.close()
        except Exception:
            pass

    def _wanted(self, t: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        n, d = self.ip_shape
        wanted: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            "guidance": ((t, self.guidance_dim), self.guidance_dtype),
            "ip_lose": ((n, d), self.ip_dtype), "ip_win": ((n, d), self.ip_dtype)}
        if self.quantized:
            wanted[SCALE_KEY] = ((t,), SCALE_DTYPE)
        if self.outliers:
            assert self.outlier_dtype is not None  # a cache with outlier channels records their dtype
            wanted[OUTLIER_INDEX_KEY] = ((self.outliers,), INDEX_DTYPE)
            wanted[OUTLIER_KEY] = ((t, self.outliers), self.outlier_dtype)
        return wanted

    def _locate(self, i: int) -> tuple[int, int, dict[str, TensorSpec]]:
        """Validate the tar header and safetensors header of sample ``i``; return its tensor specs."""
        v = self.view
        shard, off, hlen = int(v.shard_of[i]), int(v.offset[i]), int(v.header_len[i])
        fd = self._fd(shard)
        head = os.pread(fd, 512 + hlen, off - 512)
        if len(head) != 512 + hlen:
            raise CacheFormatError("file ends inside the sample header")
        try:
            info = tarfile.TarInfo.frombuf(head[:512], "utf-8", "surrogateescape")
        except tarfile.TarError as err:
            raise CacheFormatError(f"bad tar header ({err})") from None
        expected = f"{v.keys[i].decode()}.{TENSOR_EXT}"
        # A name over 100 bytes sits in a PAX header before this one; the ustar field holds its start.
        name_ok = info.name == expected or (len(info.name) == 100 and expected.startswith(info.name))
        if not name_ok or info.size != int(v.payload_size[i]):
            raise CacheFormatError(f"tar member is {info.name!r} ({info.size} B), index says {expected!r}")
        _, specs = parse_safetensors_header(head[512:])
        for name, (shape, dtype) in self._wanted(int(v.num_tokens[i])).items():
            spec = specs.get(name)
            if spec is None or spec.shape != shape or spec.dtype != dtype:
                got = None if spec is None else (spec.shape, spec.dtype)
                raise CacheFormatError(f"tensor {name!r} is {got}, expected {(shape, dtype)}")
            if spec.end > int(v.payload_size[i]):
                raise CacheFormatError(f"tensor {name!r} runs past its tar member")
        return fd, off, specs

    def read(self, indices: Sequence[int], pin_memory: bool = False, check_finite: bool = True) -> dict[str, Tensor]:
        """Batch dict: ``guidance`` [B, T_max, D], ``guidance_mask`` [B, T_max] (True = real token),
        ``ip_lose``/``ip_win`` [B, N, D], ``index`` [B] and ``num_bad`` (samples dropped as corrupt
        or non-finite); with 8-bit guidance also ``guidance_scale`` [B, T_max] (0 on padding) and,
        with outlier channels, ``guidance_outlier_index`` [B, K], ``guidance_outlier`` [B, T_max, K].

        ``check_finite=False``: values are not checked for NaN/Inf or bad 8-bit scales here; the
        caller checks them on the device (:func:`img_lightning.data.device_check.check_batch`)."""
        located, good = [], []
        for i in indices:
            try:
                located.append(self._locate(int(i)))
                good.append(int(i))
            except (CacheFormatError, OSError) as err:
                self._report_bad(int(i), err)
        b = len(good)
        n, d = self.ip_shape
        lengths = [int(self.view.num_tokens[i]) for i in good]
        t_max = max(lengths, default=0)
        names = ["guidance", "guidance_mask", "ip_lose", "ip_win"]
        layout: list[tuple[tuple[int, ...], torch.dtype]] = [
            ((b, t_max, self.guidance_dim), self.guidance_dtype), ((b, t_max), torch.bool),
            ((b, n, d), self.ip_dtype), ((b, n, d), self.ip_dtype)]
        if self.quantized:
            names.append(SCALE_KEY)
            layout.append(((b, t_max), SCALE_DTYPE))
        if self.outliers:
            assert self.outlier_dtype is not None  # a cache with outlier channels records their dtype
            names += [OUTLIER_INDEX_KEY, OUTLIER_KEY]
            layout += [((b, self.outliers), INDEX_DTYPE), ((b, t_max, self.outliers), self.outlier_dtype)]
        if self.pool is not None and not pin_memory:
            tensors = self.pool.tensors(layout)
        else:
            tensors = [torch.empty(sh, dtype=dt, pin_memory=pin_memory) for sh, dt in layout]
        batch = dict(zip(names, tensors, strict=True))
        guidance, mask, scale = batch["guidance"], batch["guidance_mask"], batch.get(SCALE_KEY)
        index, outliers = batch.get(OUTLIER_INDEX_KEY), batch.get(OUTLIER_KEY)
        keep = []
        for row, ((fd, off, specs), t) in enumerate(zip(located, lengths, strict=True)):
            parts = [("guidance", guidance[row, :t]), ("ip_lose", batch["ip_lose"][row]),
                     ("ip_win", batch["ip_win"][row])]
            if scale is not None:
                parts.append((SCALE_KEY, scale[row, :t]))
            if index is not None and outliers is not None:  # both or neither
                parts += [(OUTLIER_INDEX_KEY, index[row]), (OUTLIER_KEY, outliers[row, :t])]
            try:
                parts.sort(key=lambda p: specs[p[0]].begin)
                contiguous = all(specs[a].end == specs[b].begin for (a, _), (b, _) in pairwise(parts))
                if contiguous:  # the usual layout: one syscall for the whole sample
                    _pread_into(fd, [dest for _, dest in parts], off + specs[parts[0][0]].begin)
                else:
                    for name, dest in parts:
                        _pread_into(fd, [dest], off + specs[name].begin)
                if check_finite:
                    bad = [name for name, dest in parts if dest.is_floating_point() and has_nonfinite(dest)]
                    if scale is not None and SCALE_KEY not in bad and not scales_ok(scale[row, :t]):
                        bad.append(SCALE_KEY)
                    if bad:
                        raise nonfinite_error(bad)
                if index is not None and not _valid_index(index[row], self.guidance_dim):
                    raise CacheFormatError(f"{OUTLIER_INDEX_KEY} is not {self.outliers} distinct channels "
                                           f"below {self.guidance_dim}")
            except (CacheFormatError, OSError) as err:
                self._report_bad(good[row], err)
                continue
            # numpy, not torch: a torch fill may wake the intra-op thread pool from a reader thread
            # for a few hundred kB of padding, which costs more than the read itself.
            guidance[row, t:].view(torch.uint8).numpy().fill(0)
            if scale is not None:
                scale[row, t:].view(torch.uint8).numpy().fill(0)
            if outliers is not None:
                outliers[row, t:].view(torch.uint8).numpy().fill(0)
            row_mask = mask[row].numpy()
            row_mask[:t] = True
            row_mask[t:] = False
            keep.append(row)
        num_bad = len(indices) - len(keep)
        if len(keep) != b:  # rare: a read failed after allocation; compact the batch
            rows = torch.tensor(keep, dtype=torch.long)
            batch = {k: v[rows] for k, v in batch.items()}
        batch["index"] = torch.tensor([good[r] for r in keep], dtype=torch.long)
        batch["num_bad"] = torch.tensor(num_bad, dtype=torch.long)
        return batch

    def _report_bad(self, i: int, err: Exception) -> None:
        self._bad_log.report(i, err)
