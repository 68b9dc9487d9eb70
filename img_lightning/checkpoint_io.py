"""Checkpoints written atomically in the run directory's own file system.

Lightning's ``TorchCheckpointIO`` serialises a checkpoint into memory and writes it through an
fsspec transaction, which for local paths is a temporary file in ``$TMPDIR`` moved into place: when
``$TMPDIR`` is another file system the move is a copy into ``last.ckpt`` itself, so a full disk in
the middle leaves a truncated ``last.ckpt`` (and the error names the temporary file in ``/tmp``).

:class:`AtomicCheckpointIO` writes with ``torch.save`` straight into a hidden temporary file next to
the target (:func:`img_lightning.atomic.atomic_path`: same directory, flushed to disk, renamed), so
the previous checkpoint stays whole until the new one is complete, and nothing of the checkpoint
passes through host memory twice. A full disk (or quota) is reported as a user error naming the
run directory's file system and its free space. Reading a checkpoint that ``torch.load`` cannot
parse names the file as damaged instead of a ``PytorchStreamReader`` trace.

FSDP's sharded checkpoints are directories written by every rank; :func:`replace_directory` puts a
fully written one in place of the previous one (used by the finetune's FSDP strategy).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from .atomic import atomic_path
from .checkpoint_files import DamagedCheckpoint, replaced_name
from .errors import UserError

FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CheckpointDiskFull(UserError):
    """A checkpoint could not be written for lack of space; the previous one is intact."""


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def disk_full_error(target: Path, err: OSError) -> CheckpointDiskFull:
    """The message for ``err`` while writing the checkpoint ``target``: which disk, how full, what now."""
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = f"{shutil.disk_usage(folder).free / 1e9:.2f} GB free"
    except OSError:
        free = "free space unknown"
    return CheckpointDiskFull(
        f"the disk holding {target.parent} (file system mounted at {_mount_point(folder)}, {free}) is "
        f"full: the checkpoint {target.name} could not be written ({err.strerror}); the previous {target.name}, if "
        f"any, is intact. Free space there (or move run.root), then resume with run.ckpt_path=last")


def full_disk_cause(err: BaseException) -> Optional[OSError]:
    """The full-disk ``OSError`` behind ``err``: itself, what it was raised from or during (torch's
    zip writer turns the file object's ``OSError`` into a ``RuntimeError``), or one of a distributed
    checkpoint's per-rank failures."""
    seen: set[int] = set()
    todo: list[Optional[BaseException]] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in FULL_DISK:
            return e
        todo += [e.__cause__, e.__context__, *getattr(e, "failures", {}).values()]
    return None


@contextlib.contextmanager
def reporting_full_disk(target: Path) -> Iterator[None]:
    """Turn a full disk while writing ``target`` into :class:`CheckpointDiskFull`."""
    try:
        yield
    except CheckpointDiskFull:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised unless a full disk is behind it
        cause = full_disk_cause(err)
        if cause is None:
            raise
        raise disk_full_error(target, cause) from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with same-directory atomic writes and plain errors (see module doc)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        target = Path(path)
        # through a Python file object: a failed write keeps its OSError (errno) as the context
        with reporting_full_disk(target), atomic_path(target) as tmp, open(tmp, "wb") as fh:
            torch.save(checkpoint, fh)

    def load_checkpoint(self, path: Any, map_location: Optional[Callable] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        try:
            return torch.load(path, map_location=map_location, weights_only=True)  # never unpickle
        except RuntimeError as err:
            if "PytorchStreamReader" not in str(err) and "zip archive" not in str(err):
                raise
            raise DamagedCheckpoint(f"{path} is damaged ({err}); move it away and resume from the previous "
                                    f"checkpoint (run.ckpt_path=PATH) or start a new run") from None


def replace_directory(staged: Path, target: Path) -> None:
    """Put the finished directory ``staged`` in place of ``target``: ``target`` is renamed aside,
    ``staged`` renamed to it, then the old one removed. A kill between the two renames is completed
    by :func:`img_lightning.checkpoint_files.finish_interrupted_swap` at the next resume."""
    old = replaced_name(target)
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staged, target)
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
