"""Which parquet files an ``input`` setting names: a file, a directory (searched recursively) or a
glob. Shared by the Pick-a-Pic reader (preprocessing) and the InstructPix2Pix reader (finetuning)."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Optional


def find_parquet_files(spec: str | Path, split: Optional[str] = None) -> list[Path]:
    """Sorted parquet files named by ``spec`` (empty when none: the caller says what to do).

    For a directory and a ``split``, the files named like Hugging Face dataset shards of that split
    (``{split}-NNNNN-of-MMMMM-*.parquet``) are taken when there are any, so pointing at a downloaded
    dataset repository just works.
    """
    text = str(Path(str(spec)).expanduser())
    path = Path(text)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if split:
            files = [f for f in files if f.name.startswith(f"{split}-")] or files
        return files
    return sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
