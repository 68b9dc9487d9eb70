"""Is a checkpoint readable? Answered from its structure, without loading it, before a resume.

A resume that meets a damaged ``last.ckpt`` (a copy cut short, a disk that filled up under an
older version) used to die deep inside ``torch.load`` with ``PytorchStreamReader failed reading
zip archive``. :func:`checkpoint_problem` checks what a truncation or foreign bytes break, cheaply:

* a checkpoint file (``torch.save``'s zip): the central directory at the end of the file reads, and
  every member's data lies inside the file;
* a sharded checkpoint directory (FSDP, ``torch.distributed.checkpoint``): ``.metadata`` reads,
  every byte range it lists lies inside its shard file, and Lightning's ``meta.pt`` is a file as above.

:func:`pick_intact` turns the candidates of ``run.ckpt_path=last`` into the newest intact one,
naming each damaged one it skips; when every candidate is damaged it says which and what to do.
:func:`finish_interrupted_swap` completes a sharded directory's replacement that a kill cut between
its two renames (:func:`img_lightning.checkpoint_io.replace_directory`).
"""

from __future__ import annotations

import logging
import os
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from .errors import UserError

log = logging.getLogger(__name__)
LIGHTNING_META = "meta.pt"  # Lightning's non-tensor state beside the shards


class DamagedCheckpoint(UserError):
    """No intact checkpoint to resume from; the message names each damaged file."""


def staging_name(path: Path) -> Path:
    """Where a sharded checkpoint directory is written before it replaces ``path``."""
    return path.with_name(f".{path.name}.saving")


def replaced_name(path: Path) -> Path:
    """Where the previous ``path`` waits while the new one is renamed into place."""
    return path.with_name(f".{path.name}.replaced")


def _zip_problem(path: Path) -> Optional[str]:
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        return f"not a complete checkpoint file ({size} bytes; {err})"
    if not members:
        return "an empty archive"
    for info in members:
        if info.header_offset + info.compress_size > size:
            return f"member {info.filename} runs past the end of the file (truncated at {size} bytes)"
    return None


def _sharded_problem(path: Path) -> Optional[str]:
    if not (path / ".metadata").is_file():
        return "a directory without .metadata (not a finished sharded checkpoint)"
    try:
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # noqa: BLE001 - unpickling a damaged .metadata raises anything
        return f".metadata is unreadable ({type(err).__name__}: {err})"
    sizes: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        name = info.relative_path
        if name not in sizes:
            shard = path / name
            sizes[name] = shard.stat().st_size if shard.is_file() else -1
        if sizes[name] < 0:
            return f"its shard {name} is missing"
        if info.offset + info.length > sizes[name]:
            return f"its shard {name} is truncated ({sizes[name]} bytes, {info.offset + info.length} needed)"
    meta = path / LIGHTNING_META
    if meta.exists():
        problem = _zip_problem(meta)
        if problem:
            return f"{LIGHTNING_META} is {problem}"
    return None


def checkpoint_problem(path: str | Path) -> Optional[str]:
    """What makes ``path`` unusable as a checkpoint, or None when its structure is intact."""
    path = Path(path)
    if path.is_dir():
        return _sharded_problem(path)
    if not path.is_file():
        return "missing"
    return _zip_problem(path)


def pick_intact(candidates: Sequence[Path]) -> Optional[Path]:
    """The first intact checkpoint of ``candidates`` (newest first); each damaged one before it is
    named in a warning. None without candidates; :class:`DamagedCheckpoint` when all are damaged."""
    damaged: list[str] = []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            for line in damaged:
                log.warning("skipping a damaged checkpoint: %s; resuming from %s instead", line, path)
            return path
        damaged.append(f"{path}: {problem}")
    if damaged:
        raise DamagedCheckpoint(
            "every checkpoint to resume from is damaged:\n  " + "\n  ".join(damaged) + "\nMove the damaged files "
            "away and resume from a copy (run.ckpt_path=PATH), or start a new run (another run.name).")
    return None


def check_intact(path: str | Path, key: str = "run.ckpt_path") -> None:
    """Refuse a checkpoint given explicitly when it is damaged, naming it."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise DamagedCheckpoint(f"{key}={path}: the checkpoint is damaged ({problem}); give an intact one")


def finish_interrupted_swap(path: Path) -> None:
    """Complete the replacement of a sharded checkpoint directory cut between its two renames: the
    new one is taken when it is intact, else the previous one goes back into place."""
    old, staged = replaced_name(path), staging_name(path)
    if path.exists() or not old.exists():
        return
    chosen = staged if staged.exists() and checkpoint_problem(staged) is None else old
    try:
        os.replace(chosen, path)
    except OSError:
        if path.exists():
            return  # another rank of the same job completed it
        raise
    log.warning("completed an interrupted checkpoint save: %s is now %s", path, chosen.name)
    for leftover in (old, staged):
        if leftover.exists():
            shutil.rmtree(leftover, ignore_errors=True)


def resume_candidate(run_dir: Path, existing: Sequence[Path]) -> Optional[str]:
    """What ``run.ckpt_path=last`` resumes from among the checkpoints ``existing`` in ``run_dir``:
    the newest intact one (a damaged one is skipped, named, for the previous good one), after
    completing a sharded ``last.ckpt`` swap a kill cut short."""
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if not last.exists() and replaced_name(last).exists():
        finish_interrupted_swap(last)
        existing = [last, *existing]
    newest_first = sorted(set(existing), key=lambda p: p.stat().st_mtime, reverse=True)
    chosen = pick_intact(newest_first)
    return str(chosen) if chosen else None
