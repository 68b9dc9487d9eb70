"""Reading Pick-a-Pic v2 parquet files: which rows become training pairs, and their images.

Two passes, because the image columns are ~99% of the bytes: :func:`scan_pairs` reads only the
small columns of every file (captions, labels, uids) and decides which rows are pairs;
:class:`ImageFetcher` later reads the JPEG bytes of exactly the row groups a shard needs.

Filtering, in this order, every drop counted in :class:`ReaderStats`:
missing values in a required cell -> ``has_label`` false -> ties (0.5/0.5) -> labels that are not
a clean 1/0 split -> (optional) ``are_different`` false -> empty captions (``data.drop_empty_captions``,
default on: nothing to align to) -> both images the same uid (nothing to prefer) -> exact duplicates
(same caption, winner uid and loser uid; the first occurrence in file order wins) -> ``data.limit``.
Pairs whose two images have identical bytes are dropped when the images are read. Winner = ``jpg_0``
when ``label_0 == 1`` else ``jpg_1``. A file without a required column is an error naming the file
and the column (the input is not Pick-a-Pic); an empty file is a counted, logged skip. Undecodable
image bytes are found when a shard decodes them and are counted there (:func:`decode_image`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from img_lightning.errors import UserError
from img_lightning.parquet_files import find_parquet_files

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "image_0_uid", "image_1_uid")
IMAGE_COLUMNS = ("jpg_0", "jpg_1")
OPTIONAL_COLUMNS = ("has_label", "are_different", "ranking_id", "model_0", "model_1", "best_image_uid")


class ReaderError(UserError, ValueError):
    """Input that is not usable Pick-a-Pic data; the message names the file (and column)."""


@dataclass
class ReaderStats:
    files: int = 0
    empty_files: int = 0
    rows_read: int = 0
    missing_values: int = 0
    unlabelled: int = 0
    ties_dropped: int = 0
    bad_labels: int = 0
    # the labels name one image, best_image_uid another: the preference is not known, so never kept
    label_uid_mismatch: int = 0
    not_different: int = 0
    empty_captions: int = 0
    same_image: int = 0
    duplicates: int = 0
    over_limit: int = 0
    kept: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def _is_false(value) -> bool:
    """``has_label`` says no, however the column is typed (bool, 0/1, "false")."""
    if value is None:
        return False
    if isinstance(value, str):
        return value.strip().lower() in ("false", "0", "no")
    return not bool(value)


@dataclass
class PairTable:
    """The kept pairs, column-wise (cheap for ~1M pairs). Index ``i`` is the pair's global index."""

    files: list[str]  # parquet paths, in reading order
    file_index: np.ndarray  # [P] int32
    row: np.ndarray  # [P] int64, row within its file
    row_group: np.ndarray  # [P] int32, row group within its file
    caption: list[str]
    winner_uid: list[str]
    loser_uid: list[str]
    winner_index: np.ndarray  # [P] int8: 0 if jpg_0 won, 1 if jpg_1 won
    ranking_id: list[Optional[int]]
    pair_id: list[str]
    stats: ReaderStats = field(default_factory=ReaderStats)

    def __len__(self) -> int:
        return len(self.pair_id)

    def source(self, i: int) -> str:
        return f"{Path(self.files[int(self.file_index[i])]).name}:{int(self.row[i])}"


def pair_id_of(caption: str, winner_uid: str, loser_uid: str) -> str:
    """Stable id of a preference pair (also its dedup key and its sample key in the cache)."""
    h = hashlib.sha256("\x1f".join((caption, winner_uid, loser_uid)).encode("utf-8"))
    return h.hexdigest()[:24]


def list_parquet_files(spec: str, split: Optional[str] = None) -> list[str]:
    """Parquet files named by ``spec``: a file, a directory (searched recursively) or a glob.

    For a directory, files of ``split`` (Pick-a-Pic names them ``{split}-NNNNN-of-MMMMM-*.parquet``)
    are selected when there are any, so pointing at the downloaded repository just works.
    """
    files = [str(f) for f in find_parquet_files(spec, split)]
    if not files:
        raise ReaderError(f"data.input={spec!r} matches no parquet file (give a file, a directory or a glob)")
    return files


def _open(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ReaderError(f"{path}: not a readable parquet file ({err})") from None


def _is_clean_label(l0: float, l1: float) -> bool:
    return (l0 == 1.0 and l1 == 0.0) or (l0 == 0.0 and l1 == 1.0)


def scan_pairs(spec: str | Sequence[str], split: Optional[str] = "train", drop_ties: bool = True,
               require_different: bool = False, limit: Optional[int] = None,
               drop_empty_captions: bool = True) -> PairTable:
    """Read the small columns of every file and return the kept pairs with their statistics."""
    if not drop_ties:
        raise ReaderError("data.drop_ties=false is not supported: a tie has no winner to learn from")
    files = list_parquet_files(spec, split) if isinstance(spec, str) else [str(f) for f in spec]
    stats = ReaderStats(files=len(files))
    cols: dict[str, list] = {k: [] for k in ("file_index", "row", "row_group", "caption", "winner_uid",
                                             "loser_uid", "winner_index", "ranking_id", "pair_id")}
    seen: set[str] = set()
    for fi, path in enumerate(files):
        pf = _open(path)
        names = set(pf.schema_arrow.names)
        for col in REQUIRED_COLUMNS:
            if col not in names:
                raise ReaderError(
                    f"{path}: required column {col!r} is missing (Pick-a-Pic v2 files have "
                    f"{', '.join(REQUIRED_COLUMNS)}); is data.input pointing at the right dataset?"
                )
        if pf.metadata.num_rows == 0:
            stats.empty_files += 1
            log.warning("skipping %s: the file has no rows", path)
            continue
        wanted = [c for c in REQUIRED_COLUMNS if c not in IMAGE_COLUMNS] + [c for c in OPTIONAL_COLUMNS if c in names]
        table = _read_small_columns(pf, path, wanted)
        group_of_row = np.repeat(np.arange(pf.metadata.num_row_groups, dtype=np.int32),
                                 [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)])
        n = len(table["caption"])
        stats.rows_read += n
        for r in range(n):
            caption, l0, l1 = table["caption"][r], table["label_0"][r], table["label_1"][r]
            u0, u1 = table["image_0_uid"][r], table["image_1_uid"][r]
            if caption is None or l0 is None or l1 is None or u0 is None or u1 is None:
                stats.missing_values += 1
                continue
            if "has_label" in table and _is_false(table["has_label"][r]):
                stats.unlabelled += 1
                continue
            if l0 == 0.5 and l1 == 0.5:
                stats.ties_dropped += 1
                continue
            if not _is_clean_label(float(l0), float(l1)):
                stats.bad_labels += 1
                continue
            if require_different and "are_different" in table and not table["are_different"][r]:
                stats.not_different += 1
                continue
            if drop_empty_captions and not caption.strip():
                stats.empty_captions += 1
                continue
            if u0 == u1:
                stats.same_image += 1
                continue
            winner_index = 0 if l0 == 1.0 else 1
            winner, loser = (u0, u1) if winner_index == 0 else (u1, u0)
            best = table["best_image_uid"][r] if "best_image_uid" in table else None
            if best and best != winner:
                stats.label_uid_mismatch += 1
                continue
            pid = pair_id_of(caption, winner, loser)
            if pid in seen:
                stats.duplicates += 1
                continue
            if limit is not None and len(seen) >= limit:
                stats.over_limit += 1
                continue
            seen.add(pid)
            rid = table["ranking_id"][r] if "ranking_id" in table else None
            for key, value in (("file_index", fi), ("row", r), ("row_group", int(group_of_row[r])),
                               ("caption", caption), ("winner_uid", winner), ("loser_uid", loser),
                               ("winner_index", winner_index), ("ranking_id", rid), ("pair_id", pid)):
                cols[key].append(value)
    stats.kept = len(cols["pair_id"])
    return PairTable(
        files=files,
        file_index=np.asarray(cols["file_index"], dtype=np.int32),
        row=np.asarray(cols["row"], dtype=np.int64),
        row_group=np.asarray(cols["row_group"], dtype=np.int32),
        caption=cols["caption"],
        winner_uid=cols["winner_uid"],
        loser_uid=cols["loser_uid"],
        winner_index=np.asarray(cols["winner_index"], dtype=np.int8),
        ranking_id=cols["ranking_id"],
        pair_id=cols["pair_id"],
        stats=stats,
    )


def _read_small_columns(pf: pq.ParquetFile, path: str, columns: list[str]) -> dict[str, list]:
    """The non-image columns of a file; a caption column that is not text is a clear error."""
    caption_type = pf.schema_arrow.field("caption").type
    if not (pa.types.is_string(caption_type) or pa.types.is_large_string(caption_type)):
        raise ReaderError(
            f"{path}: column 'caption' has type {caption_type}, expected a string column (Pick-a-Pic "
            f"captions are UTF-8 text); is data.input pointing at the right dataset?"
        )
    try:
        return pf.read(columns=columns).to_pydict()
    except (pa.ArrowInvalid, UnicodeDecodeError) as err:
        raise ReaderError(f"{path}: cannot read the text columns ({_no_addresses(str(err))}); "
                          f"the file is damaged or not UTF-8") from None


_ADDRESS = re.compile(r"\s*(?:object )?at 0x[0-9a-fA-F]+")


def _no_addresses(text: str) -> str:
    """Drop ``<... object at 0x7f..>`` addresses from messages kept in reports (they differ per run)."""
    return _ADDRESS.sub("", text)


def _cell_bytes(value: object) -> Optional[bytes | bytearray]:
    """Image cell -> bytes. Pick-a-Pic stores raw ``binary``; HF ``Image`` columns are structs."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return value if isinstance(value, (bytes, bytearray)) else None


class ImageFetcher:
    """JPEG bytes of given pairs, reading each needed parquet row group once (small LRU cache)."""

    MAX_OPEN_FILES = 32  # Pick-a-Pic train has 645 files; stay far below the usual fd limit

    def __init__(self, table: PairTable, cache_row_groups: int = 8) -> None:
        self.table = table
        self.capacity = max(1, int(cache_row_groups))
        self._cache: OrderedDict[tuple[int, int], dict[str, list]] = OrderedDict()
        self._files: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self._group_start: dict[int, np.ndarray] = {}

    def _row_group(self, fi: int, rg: int) -> dict[str, list]:
        key = (fi, rg)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if fi in self._files:
            self._files.move_to_end(fi)
        else:
            pf = _open(self.table.files[fi])
            self._files[fi] = pf
            if fi not in self._group_start:
                sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
                self._group_start[fi] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            while len(self._files) > self.MAX_OPEN_FILES:
                _, old = self._files.popitem(last=False)
                old.close()
        data = self._files[fi].read_row_group(rg, columns=list(IMAGE_COLUMNS)).to_pydict()
        self._cache[key] = data
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return data

    def fetch(self, indices: Sequence[int]) -> list[tuple[Optional[bytes], Optional[bytes]]]:
        """``(winner_bytes, loser_bytes)`` per pair index, in the order given."""
        t = self.table
        out: list = [None] * len(indices)
        order = sorted(range(len(indices)), key=lambda j: (t.file_index[indices[j]], t.row[indices[j]]))
        for j in order:
            i = int(indices[j])
            fi, rg = int(t.file_index[i]), int(t.row_group[i])
            data = self._row_group(fi, rg)
            local = int(t.row[i] - self._group_start[fi][rg])
            b0, b1 = _cell_bytes(data["jpg_0"][local]), _cell_bytes(data["jpg_1"][local])
            out[j] = (b0, b1) if t.winner_index[i] == 0 else (b1, b0)
        return out


def decode_image(data: Optional[bytes]) -> tuple[Optional[Image.Image], Optional[str]]:
    """Fully decode image bytes to RGB; ``(None, reason)`` for anything unusable (never raises)."""
    if not data:
        return None, "missing image bytes"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = im.convert("RGB")
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad bytes
        return None, f"undecodable image ({type(err).__name__}: {_no_addresses(str(err))[:80]})"
    if min(rgb.size) < 1 or math.prod(rgb.size) == 0:
        return None, "empty image"
    return rgb, None
