"""One run per run directory: an exclusive ``flock`` held for the life of a training run.

Two jobs started with the same ``run.name`` would otherwise both write ``config.yaml``,
checkpoints and the export, and both exit 0 with a directory that is half one run and half the
other. The discipline is the cache shards' (:mod:`img_lightning.cache.lock`): a non-blocking
exclusive ``flock`` on ``RUN/.run.lock``, which the kernel drops when the holder exits for any
reason (kill -9 included), so a crash never leaves the directory locked. The holder writes who it
is into the lock file (host, pid, SLURM job id, since when, command) so a refused run can name it.

*Which process holds it.* Global rank 0 only (it writes ``config.yaml``, the export and the
summary). Rank 0 looks at the lock when the job starts, before any work, and takes it once the
pre-run checks have passed. Under SLURM every other rank looks too (the job id says whose lock it
is) and refuses with rank 0 when another job holds it, so a refused multi-node job stops on every
node instead of leaving ranks waiting for a rank 0 that has gone; the other ranks of a launch
without SLURM leave the decision to their rank 0.

*A requeued job takes it over.* On SLURM the lock belongs to the job: a requeued job has the same
job id, and when the lock still looks held by that id (a network file system can keep a dead
node's lock for a while) the new instance takes it over instead of refusing itself.

*Scope.* :func:`run_locked` marks the job function a lock lives for (and refuses at its entry,
before any work, a directory another run holds); :func:`take_run_lock`, called inside it once the
rank is known and the pre-run checks have passed, takes the lock, released when the job returns
or raises.

``flock`` on network file systems: see :mod:`img_lightning.cache.lock` (Lustre needs the ``flock``
mount option; NFSv4 maps it to POSIX locks).
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import functools
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional, TypeVar, cast

from .config.stages import AnyStageConfig
from .errors import UserError

LOCK_NAME = ".run.lock"
log = logging.getLogger(__name__)
_HELD: contextvars.ContextVar[Optional[list[RunLock]]] = contextvars.ContextVar("img_run_locks", default=None)
F = TypeVar("F", bound=Callable[..., Any])


class RunDirectoryInUse(UserError):
    """Another live run holds the run directory; the message names it."""


def _job_id() -> Optional[str]:
    return os.environ.get("SLURM_JOB_ID") or None


def _record(command: str) -> dict[str, Any]:
    return {"host": platform.node(), "pid": os.getpid(), "slurm_job_id": _job_id(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command, "argv": sys.argv}


def describe_holder(holder: dict[str, Any]) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return (f"{holder.get('command', '?')} on host {holder.get('host', '?')}, pid {holder.get('pid', '?')}{job}, "
            f"since {holder.get('since', '?')}")


def read_holder(path: Path) -> dict[str, Any]:
    """The holder record of a lock file ({} when it is empty or unreadable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class RunLock:
    """The lock of one run directory held by this process (``fd`` None: taken over, see above)."""

    def __init__(self, path: Path, fd: Optional[int]) -> None:
        self.path = path
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _alive_here(holder: dict[str, Any]) -> bool:
    """The holder is another live process on this host (then it is no earlier instance of a job)."""
    pid = holder.get("pid")
    if holder.get("host") != platform.node() or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_record(fd: int, command: str) -> None:
    data = (json.dumps(_record(command), indent=1) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _refusal(run_dir: Path, path: Path, holder: dict[str, Any]) -> RunDirectoryInUse:
    who = describe_holder(holder) if holder else "a process that has not said who it is yet"
    return RunDirectoryInUse(
        f"{run_dir} is in use by another run ({who}). Wait for it to finish or use another run.name. If that "
        f"process is gone (a crashed node on a network file system can keep its lock for a while), remove {path}.")


def acquire_run_lock(run_dir: Path, command: str) -> RunLock:
    """Take the lock of ``run_dir`` (created if needed) or raise :class:`RunDirectoryInUse`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = read_holder(path)
        job = _job_id()
        if job is None or holder.get("slurm_job_id") != job or _alive_here(holder):
            os.close(fd)
            raise _refusal(run_dir, path, holder) from None
        # A requeued instance of the job that holds it: the previous instance is gone.
        log.warning("taking over the lock of %s from an earlier instance of SLURM job %s (%s)", run_dir, job,
                    describe_holder(holder))
        _write_record(fd, command)
        os.close(fd)
        return RunLock(path, None)
    _write_record(fd, command)
    return RunLock(path, fd)


def _ours(holder: dict[str, Any]) -> bool:
    """The holder is this run: the same SLURM job, or this very process."""
    job = _job_id()
    if job is not None and holder.get("slurm_job_id") == job:
        return True
    return holder.get("host") == platform.node() and holder.get("pid") == os.getpid()


def _env_rank() -> Optional[int]:
    """This process's global rank as the launcher's environment says (Lightning's order), None when
    no launcher set one (a single process)."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return None


def _can_judge(rank: Optional[int]) -> bool:
    """Whether this process can tell another run's lock from its own run's: rank 0 (the holder), or
    any rank of a SLURM job (the job id says whose it is). Other ranks of a non-SLURM launch cannot
    (their rank 0 is another process, maybe on another host) and leave it to their rank 0."""
    return _job_id() is not None or not rank


def refuse_if_held(run_dir: Path) -> None:
    """Refuse, without creating anything, when another run holds ``run_dir``."""
    path = run_dir / LOCK_NAME
    if not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)  # free: nobody runs here now
        return
    except BlockingIOError:
        holder = read_holder(path)
    finally:
        os.close(fd)
    if holder and not _ours(holder):
        raise _refusal(run_dir, path, holder)


def run_locked(fn: F) -> F:
    """Decorator of a job whose first argument is a config with a ``run`` block: its run directory
    is checked at entry (refused when another run holds it, before any work), and the lock
    :func:`take_run_lock` takes inside is released when ``fn`` returns or raises."""
    from .run_dir import run_directory

    @functools.wraps(fn)
    def wrapper(cfg: AnyStageConfig, *args: Any, **kwargs: Any) -> Any:
        if _can_judge(_env_rank()):
            refuse_if_held(run_directory(cfg.run))
        held: list[RunLock] = []
        token = _HELD.set(held)
        try:
            return fn(cfg, *args, **kwargs)
        finally:
            _HELD.reset(token)
            for lock in reversed(held):
                lock.release()

    return cast(F, wrapper)  # fn's own signature (generic ones included), which ParamSpec would lose


def take_run_lock(run_dir: Path, command: str, rank: int = 0) -> None:
    """Hold ``run_dir`` for the rest of the enclosing :func:`run_locked` function: rank 0 takes the
    lock, the other ranks check that no other run holds it."""
    held = _HELD.get()
    if held is None:
        raise RuntimeError("take_run_lock() must be called inside a @run_locked function")
    if rank != 0:
        if _can_judge(rank):
            refuse_if_held(run_dir)
        return
    held.append(acquire_run_lock(run_dir, command))


@contextlib.contextmanager
def holding_run_directory(run_dir: Path, command: str) -> Iterator[None]:
    """The lock of ``run_dir`` for a one-process command (``img-finetune-mllm export``)."""
    lock = acquire_run_lock(run_dir, command)
    try:
        yield
    finally:
        lock.release()
