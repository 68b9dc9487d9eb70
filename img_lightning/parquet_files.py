"""Which parquet files an ``input`` setting names: a file, a directory (searched recursively) or a
glob. Shared by the Pick-a-Pic reader (preprocessing) and the InstructPix2Pix reader (finetuning)."""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Optional

from .errors import UserError

# Hugging Face dataset shards: {split}-NNNNN-of-MMMMM[-hash].parquet
HF_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}")


class SplitNotFoundError(UserError):
    """A dataset folder holds shards of other splits only: reading them all would silently train on
    (or evaluate with) the wrong split."""


def find_parquet_files(spec: str | Path, split: Optional[str] = None) -> list[Path]:
    """Sorted parquet files named by ``spec`` (empty when none: the caller says what to do).

    For a directory and a ``split``, the files named like Hugging Face dataset shards of that split
    (``{split}-NNNNN-of-MMMMM-*.parquet``) are taken, so pointing at a downloaded dataset repository
    just works. A directory whose shards are all of other splits is refused
    (:class:`SplitNotFoundError`); one without split-named shards is read whole (your own layout).
    A file or a glob is taken as given.
    """
    text = str(Path(str(spec)).expanduser())
    path = Path(text)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if split:
            mine = [f for f in files if f.name.startswith(f"{split}-")]
            if mine:
                return mine
            others = sorted({m.group("split") for f in files if (m := HF_SHARD.match(f.name))})
            if others:
                raise SplitNotFoundError(
                    f"{path} holds dataset shards of the split(s) {others} but none of split {split!r} "
                    f"({split}-NNNNN-of-MMMMM*.parquet); set data.split to the split you mean, or name the "
                    f"files to read with a file path or a glob")
        return files
    return sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
