"""Streaming reader of edit triplets in the InstructPix2Pix parquet layout.

``timbrooks/instructpix2pix-clip-filtered`` (313K rows in ~260 parquet files) has the columns
``original_prompt``, ``original_image`` (a struct ``{bytes, path}``), ``edit_prompt`` (the edit
instruction), ``edited_prompt`` and ``edited_image``. A training sample is the triplet {original
image I0, edited prompt T1, instruction TE}.

Two passes, because the images are nearly all of the bytes:

* :func:`scan_triplets` reads only the three text columns, row group by row group, and builds the
  :class:`TripletIndex` (where each row lives, its key, its texts, its split). Rows with an empty
  instruction or edited prompt, or with the MLLM's image placeholder in their text, are counted
  and dropped here.
* :class:`RowGroupImages` later reads the ``original_image`` column of exactly the row groups a
  batch needs (an LRU of row groups; never the whole set in memory). Undecodable images are found
  when decoded (:func:`decode_image`) and counted by the loader.

Keys and the held-out split are stable across machines and runs: a row's *group* is the sha256 of
its three texts (the dataset repeats a text triplet with several generated images), its key is
``{group}-{n}`` for the n-th occurrence in file order, and a group is held out when
``sha256(salt:group)`` falls below ``heldout_fraction`` - the same text never lands on both sides.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import UserError
from ..parquet_files import find_parquet_files

log = logging.getLogger(__name__)

TEXT_COLUMNS = ("original_prompt", "edit_prompt", "edited_prompt")
IMAGE_COLUMN = "original_image"
REQUIRED_COLUMNS = (*TEXT_COLUMNS, IMAGE_COLUMN)
IMAGE_MARKERS = ("<image>", "<|image_pad|>", "<|vision_start|>")


class TripletDataError(UserError, ValueError):
    """Input that is not usable InstructPix2Pix-layout data; the message names the file and column."""


def list_parquet_files(spec: str | Path) -> list[Path]:
    """A parquet file, a directory (every ``*.parquet`` below it) or a glob -> sorted files."""
    files = find_parquet_files(spec)
    if not files:
        raise TripletDataError(f"data.input={spec}: no parquet files found (give a file, a directory of *.parquet "
                               f"or a glob; the InstructPix2Pix set: hf download "
                               f"timbrooks/instructpix2pix-clip-filtered --repo-type dataset)")
    return files


@dataclass
class ScanStats:
    files: int = 0
    rows_read: int = 0
    empty_instructions: int = 0
    empty_prompts: int = 0
    placeholder_in_text: int = 0  # the text holds an MLLM image placeholder ("<image>")
    kept: int = 0
    train: int = 0
    heldout: int = 0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class TripletIndex:
    """The kept rows, column-wise; position ``i`` is the sample's id."""

    files: list[str]
    file_index: np.ndarray  # [N] int32
    row_group: np.ndarray  # [N] int32, within its file
    row: np.ndarray  # [N] int64, within its row group
    group_of: np.ndarray  # [N] int64, global row-group number (planning: shuffle windows)
    keys: list[str]
    original_prompt: list[str]
    instruction: list[str]
    edited_prompt: list[str]
    heldout: np.ndarray  # [N] bool
    stats: ScanStats = field(default_factory=ScanStats)
    fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def train_ids(self) -> np.ndarray:
        return np.flatnonzero(~self.heldout).astype(np.int64)

    @property
    def heldout_ids(self) -> np.ndarray:
        return np.flatnonzero(self.heldout).astype(np.int64)

    def location(self, i: int) -> tuple[int, int, int]:
        return int(self.file_index[i]), int(self.row_group[i]), int(self.row[i])


def text_group(original: str, instruction: str, edited: str) -> str:
    """Stable id of a text triplet (the dataset repeats one with several generated images)."""
    return hashlib.sha256("\x1f".join((original, instruction, edited)).encode("utf-8")).hexdigest()[:16]


def is_heldout(group: str, fraction: float, salt: str) -> bool:
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{salt}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def _is_text(t) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def _is_bytes(t) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_null(t)


def _is_image(t) -> bool:
    import pyarrow as pa

    if pa.types.is_struct(t):
        fields = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
        return "bytes" in fields and _is_bytes(fields["bytes"])
    return _is_bytes(t)


def _check_schema(path: Path, schema) -> None:
    """The columns are there and of the types the reader handles (checked when the file is opened,
    not when a row of the wrong type is reached deep inside training)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise TripletDataError(
            f"{path}: missing column(s) {missing}; an InstructPix2Pix-layout parquet has {list(REQUIRED_COLUMNS)} "
            f"(+ edited_image), with original_image a struct {{bytes, path}} or raw image bytes")
    wrong = [f"{c} is {schema.field(c).type} (expected a string column)" for c in TEXT_COLUMNS
             if not _is_text(schema.field(c).type)]
    if not _is_image(schema.field(IMAGE_COLUMN).type):
        wrong.append(f"{IMAGE_COLUMN} is {schema.field(IMAGE_COLUMN).type} (expected a struct {{bytes: binary, "
                     f"path: string}} or a binary column of encoded images)")
    if wrong:
        raise TripletDataError(f"{path}: column(s) of the wrong type: {'; '.join(wrong)}. Convert the file to the "
                               f"InstructPix2Pix layout (timbrooks/instructpix2pix-clip-filtered)")


def scan_triplets(spec: str | Path, heldout_fraction: float = 0.0, salt: str = "img-finetune-heldout-v1",
                  progress: bool = False) -> TripletIndex:
    """Read the text columns of every row group once and index the usable triplets."""
    import pyarrow.parquet as pq

    files = list_parquet_files(spec)
    stats = ScanStats(files=len(files))
    cols: dict[str, list] = {k: [] for k in ("file_index", "row_group", "row", "group_of", "keys", "original_prompt",
                                            "instruction", "edited_prompt", "heldout")}
    occurrences: dict[str, int] = {}
    fp = hashlib.sha256()
    global_group = 0
    bar = _progress(progress, sum(pq.ParquetFile(f).num_row_groups for f in files), "scan")
    for fi, path in enumerate(files):
        try:
            pf = pq.ParquetFile(path)
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a broken file
            raise TripletDataError(f"{path}: not a readable parquet file ({err})") from None
        _check_schema(path, pf.schema_arrow)
        fp.update(f"{path.name}:{path.stat().st_size}:{pf.metadata.num_rows}\n".encode())
        for rg in range(pf.num_row_groups):
            table = pf.read_row_group(rg, columns=list(TEXT_COLUMNS))
            texts = {c: table.column(c).to_pylist() for c in TEXT_COLUMNS}
            for r in range(table.num_rows):
                stats.rows_read += 1
                original = texts["original_prompt"][r] or ""
                instruction = (texts["edit_prompt"][r] or "").strip()
                edited = (texts["edited_prompt"][r] or "").strip()
                if not instruction:
                    stats.empty_instructions += 1
                    continue
                if not edited:
                    stats.empty_prompts += 1
                    continue
                if any(m in t for m in IMAGE_MARKERS for t in (instruction, edited)):
                    stats.placeholder_in_text += 1
                    continue
                group = text_group(original, instruction, edited)
                n = occurrences.get(group, 0)
                occurrences[group] = n + 1
                key = f"{group}-{n}"
                held = is_heldout(group, heldout_fraction, salt)
                for name, value in (("file_index", fi), ("row_group", rg), ("row", r), ("group_of", global_group),
                                    ("keys", key), ("original_prompt", original), ("instruction", instruction),
                                    ("edited_prompt", edited), ("heldout", held)):
                    cols[name].append(value)
                fp.update(f"{key}:{int(held)}\n".encode())
            global_group += 1
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    heldout = np.asarray(cols["heldout"], dtype=bool)
    stats.kept = len(cols["keys"])
    stats.heldout = int(heldout.sum())
    stats.train = stats.kept - stats.heldout
    return TripletIndex(
        files=[str(f) for f in files],
        file_index=np.asarray(cols["file_index"], dtype=np.int32),
        row_group=np.asarray(cols["row_group"], dtype=np.int32),
        row=np.asarray(cols["row"], dtype=np.int64),
        group_of=np.asarray(cols["group_of"], dtype=np.int64),
        keys=cols["keys"],
        original_prompt=cols["original_prompt"],
        instruction=cols["instruction"],
        edited_prompt=cols["edited_prompt"],
        heldout=heldout,
        stats=stats,
        fingerprint=fp.hexdigest(),
    )


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row group", leave=False)


# -- images ------------------------------------------------------------------------------------------
class CorruptImage(Exception):
    """Image bytes that are missing or do not decode (counted and skipped by the loader)."""


def decode_image(data: Optional[bytes]):
    """Decode and fully load an image (a truncated file fails here, not later); RGB."""
    from PIL import Image

    if not data:
        raise CorruptImage("no image bytes")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise CorruptImage(f"{type(err).__name__}: {err}") from None
    return image if image.mode == "RGB" else image.convert("RGB")


def _image_bytes(column) -> list[Optional[bytes]]:
    """``original_image`` as a list of bytes: a struct {bytes, path} (datasets' Image feature) or raw bytes."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_struct(column.type):
        names = [column.type.field(i).name for i in range(column.type.num_fields)]
        if "bytes" not in names:
            raise TripletDataError(f"{IMAGE_COLUMN} is a struct without a 'bytes' field ({names}); images stored "
                                   f"only as paths are not supported")
        column = column.field("bytes")
    return column.to_pylist()


class RowGroupImages:
    """``original_image`` bytes of row groups, read on demand and kept in an LRU of ``capacity``
    row groups. Thread-safe: concurrent requests for one row group read it once."""

    def __init__(self, files: Sequence[str], capacity: int = 32) -> None:
        self.files = list(files)
        self.capacity = max(1, int(capacity))
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int], Future] = OrderedDict()
        self._local = threading.local()
        self.row_groups_read = 0

    def _parquet(self, fi: int):
        import pyarrow.parquet as pq

        handles = getattr(self._local, "handles", None)
        if handles is None:
            handles = self._local.handles = {}
        if fi not in handles:  # one handle per thread: ParquetFile is not meant for concurrent use
            handles[fi] = pq.ParquetFile(self.files[fi])
        return handles[fi]

    def row_group(self, fi: int, rg: int) -> list[Optional[bytes]]:
        key = (fi, rg)
        with self._lock:
            cached = self._cache.get(key)
            owner = cached is None
            if cached is None:
                future: Future = Future()
                self._cache[key] = future
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
            else:
                future = cached
                self._cache.move_to_end(key)
        if owner:
            try:
                table = self._parquet(fi).read_row_group(rg, columns=[IMAGE_COLUMN])
                future.set_result(_image_bytes(table.column(IMAGE_COLUMN)))
                self.row_groups_read += 1
            except TripletDataError as err:
                self._fail(key, future, err)
            except Exception as err:  # noqa: BLE001 - pyarrow raises several types for damaged files
                self._fail(key, future, TripletDataError(
                    f"{self.files[fi]}: row group {rg} cannot be read ({type(err).__name__}: {err}); the file is "
                    f"damaged: download it again"))
        return future.result()

    def _fail(self, key: tuple[int, int], future: Future, err: Exception) -> None:
        with self._lock:
            self._cache.pop(key, None)
        future.set_exception(err)

    def image_bytes(self, fi: int, rg: int, row: int) -> Optional[bytes]:
        return self.row_group(fi, rg)[row]
