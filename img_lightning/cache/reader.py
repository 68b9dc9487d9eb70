"""Random-access reading of a feature cache, one copy from the page cache into the batch.

:class:`CacheView` is built in the main process on every rank from the manifest and the shard
index files (cheap: no tensor bytes are read) and is identical everywhere, which is what lets
ranks agree on the sample space. :class:`BatchReader` lives in a loader worker: it reads each
tensor with ``preadv`` directly into its row of the padded batch, so tensor bytes are copied
exactly once (kernel to batch); in a worker the batch is allocated in shared memory, so handing it
to the main process copies nothing either.
"""

from __future__ import annotations

import logging
import math
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .format import CACHE_DTYPES, TENSOR_EXT, CacheFormatError, parse_safetensors_header
from .manifest import Manifest, read_shard_index, sha256_file

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
    def skipped_fraction(self) -> float:
        total = self.manifest.num_samples
        return sum(s.num_samples for s in self.skipped) / total if total else 0.0

    @property
    def guidance_dim(self) -> int:
        return int(self.manifest.tensors["guidance"]["dim"])

    @property
    def ip_shape(self) -> tuple[int, int]:
        n, d = self.manifest.tensors["ip"]["shape"]
        return int(n), int(d)

    @property
    def dtype(self) -> torch.dtype:
        name = self.manifest.tensors["guidance"]["dtype"]
        if name not in CACHE_DTYPES:
            raise CacheFormatError(f"{self.root}: unsupported cache dtype {name!r}")
        return CACHE_DTYPES[name]

    @classmethod
    def open(cls, root: str | Path, verify_checksums: bool = False) -> "CacheView":
        """Load the manifest and every shard index; shards that are missing, truncated or (with
        ``verify_checksums``) corrupt are skipped with a warning and listed in ``skipped``."""
        root = Path(root)
        manifest = Manifest.load(root)
        if not manifest.tensors:
            raise CacheFormatError(f"{root}/manifest.json: no tensor shapes recorded (empty cache?)")
        paths, shard_of, cols, keys, skipped = [], [], [], [], []
        for entry in manifest.shards:
            path = root / entry.name
            reason = _shard_problem(path, entry.bytes, entry.sha256 if verify_checksums else None)
            records = None
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


def alloc(shape: Sequence[int], dtype: torch.dtype, shared: bool) -> Tensor:
    """Uninitialised tensor, in shared memory when built inside a DataLoader worker."""
    if not shared:
        return torch.empty(tuple(shape), dtype=dtype)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    storage = torch.UntypedStorage._new_shared(max(nbytes, 1))
    return torch.empty(0, dtype=dtype).set_(storage, 0, tuple(shape))


def _pread_into(fd: int, dest: Tensor, offset: int) -> None:
    view = memoryview(dest.view(torch.uint8).numpy()).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CacheFormatError(f"unexpected end of file at byte {offset + done}")
        done += n


class BatchReader:
    """Reads batches of samples by index into padded tensors (one copy per tensor byte)."""

    def __init__(self, view: CacheView, max_open: int = 64) -> None:
        self.view = view
        self.max_open = max_open
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._warned: set[int] = set()
        self.dtype = view.dtype
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

    def _locate(self, i: int):
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
        if info.name != expected or info.size != int(v.payload_size[i]):
            raise CacheFormatError(f"tar member is {info.name!r} ({info.size} B), index says {expected!r}")
        _, specs = parse_safetensors_header(head[512:])
        t = int(v.num_tokens[i])
        n, d = self.ip_shape
        wanted = {"guidance": (t, self.guidance_dim), "ip_lose": (n, d), "ip_win": (n, d)}
        for name, shape in wanted.items():
            spec = specs.get(name)
            if spec is None or spec.shape != shape or spec.dtype != self.dtype:
                got = None if spec is None else (spec.shape, spec.dtype)
                raise CacheFormatError(f"tensor {name!r} is {got}, expected {(shape, self.dtype)}")
            if spec.end > int(v.payload_size[i]):
                raise CacheFormatError(f"tensor {name!r} runs past its tar member")
        return fd, off, specs

    def read(self, indices: Sequence[int], shared: Optional[bool] = None) -> dict[str, Tensor]:
        """Batch dict: ``guidance`` [B, T_max, D], ``guidance_mask`` [B, T_max] (True = real token),
        ``ip_lose``/``ip_win`` [B, N, D], ``index`` [B] and ``num_bad`` (samples dropped as corrupt)."""
        if shared is None:
            shared = torch.utils.data.get_worker_info() is not None
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
        guidance = alloc((b, t_max, self.guidance_dim), self.dtype, shared)
        mask = alloc((b, t_max), torch.bool, shared)
        ip_lose = alloc((b, n, d), self.dtype, shared)
        ip_win = alloc((b, n, d), self.dtype, shared)
        keep = []
        for row, ((fd, off, specs), t) in enumerate(zip(located, lengths)):
            try:
                _pread_into(fd, guidance[row, :t], off + specs["guidance"].begin)
                _pread_into(fd, ip_lose[row], off + specs["ip_lose"].begin)
                _pread_into(fd, ip_win[row], off + specs["ip_win"].begin)
            except (CacheFormatError, OSError) as err:
                self._report_bad(good[row], err)
                continue
            guidance[row, t:].zero_()
            mask[row, :t] = True
            mask[row, t:] = False
            keep.append(row)
        num_bad = len(indices) - len(keep)
        if len(keep) != b:  # rare: a read failed after allocation; compact the batch
            rows = torch.tensor(keep, dtype=torch.long)
            guidance, mask, ip_lose, ip_win = (x[rows] for x in (guidance, mask, ip_lose, ip_win))
        return {
            "guidance": guidance,
            "guidance_mask": mask,
            "ip_lose": ip_lose,
            "ip_win": ip_win,
            "index": torch.tensor([good[r] for r in keep], dtype=torch.long),
            "num_bad": torch.tensor(num_bad, dtype=torch.long),
        }

    def _report_bad(self, i: int, err: Exception) -> None:
        shard = int(self.view.shard_of[i])
        if shard not in self._warned:
            self._warned.add(shard)
            log.warning(
                "dropping corrupt sample %s in %s: %s (further problems in this shard are counted, not "
                "logged; run `img-preprocess verify %s`)",
                self.view.keys[i].decode(),
                self.view.shard_paths[shard],
                err,
                self.view.root,
            )
