"""One writer per shard: exclusive ``flock`` locks that a crashed process releases by itself.

Two ``img-preprocess`` processes on the same output (overlapping SLURM arrays, a manual re-run
while a job still runs) must never remove or overwrite each other's work. Before a task starts on
a shard it takes ``{cache}/.locks/{shard}.lock`` with a non-blocking exclusive ``flock``; a shard
whose lock is held elsewhere is left to its writer (and logged). The kernel drops the lock when the
holder exits for any reason, kill -9 included, so a crash never leaves a shard locked for good.
While holding a shard's lock a task may delete that shard's leftover temporary files: no live
process can be writing them.

``flock`` is advisory and per host on some network file systems: on Lustre mount with ``flock``
(or ``localflock`` for jobs confined to one node), on NFS it maps to POSIX locks (fine with NFSv4).
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

LOCK_DIR = ".locks"


class ShardLocks:
    """The shard locks this process holds in one cache directory (thread-safe)."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.dir = Path(cache_dir) / LOCK_DIR
        self._held: dict[str, int] = {}
        self._mutex = threading.Lock()

    def acquire(self, name: str) -> bool:
        """Take the lock of shard ``name`` without waiting; False when another process holds it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._mutex:
            if name in self._held:
                return True
            fd = os.open(self.dir / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            # The lock file stays empty: a cache directory's contents must not depend on who wrote it.
            self._held[name] = fd
            return True

    def release(self, name: str) -> None:
        with self._mutex:
            fd = self._held.pop(name, None)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def release_all(self) -> None:
        for name in list(self._held):
            self.release(name)

    def __enter__(self) -> ShardLocks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release_all()
