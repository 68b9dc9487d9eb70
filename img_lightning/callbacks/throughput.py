"""Samples/s and the share of wall time spent waiting for data (training is bound by reading the cache).

Why not Lightning's ``ThroughputMonitor``: it calls ``torch.cuda.synchronize()`` after every
training batch, which stalls the CPU that should be preparing the next batch while the GPU works,
and it cannot see the time spent blocked on the loader, the figure that matters for a cache-bound
job. This callback synchronises only at logging steps and reads the wait from our loader.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ..log_steps import is_logging_step


class Throughput(Callback):
    """Logs, over the window since the previous logging step, ``perf/samples_per_s`` (global: all
    ranks), ``perf/data_wait_share`` (wall time the training loop was blocked on the loader) and
    ``data/bad_samples``.

    The wait is measured inside our loader (time blocked on reader threads), so validation and
    checkpointing in the window count as wall time but not as data wait. On CUDA the device is
    synchronised at logging steps only, so the window's wall time includes its queued kernels.
    A job that counts other things (the MLLM finetune's tokens) overrides :meth:`_reset`,
    :meth:`_count` and :meth:`_log`; the window, the wait and the synchronisation stay here.
    """

    def __init__(self) -> None:
        self._window_start: Optional[float] = None
        self._wait_start = 0.0
        self._reset()

    @staticmethod
    def _loader_wait(trainer: L.Trainer) -> float:
        loader = getattr(getattr(trainer, "datamodule", None), "train_loader", None)
        return float(getattr(loader, "wait_seconds", 0.0))

    def _reset(self) -> None:
        """Zero the window's counters."""
        self._samples = 0

    def _count(self, trainer: L.Trainer, batch: Any) -> None:
        """Add one batch to the window's counters (no device synchronisation)."""
        self._samples += int(batch["ip_lose"].shape[0]) * trainer.world_size

    def _log(self, trainer: L.Trainer, pl_module: Any, wall: float, wait: float) -> None:
        """Log the window that took ``wall`` seconds, ``wait`` of them blocked on the loader."""
        if wall > 0:
            pl_module.log("perf/samples_per_s", self._samples / wall, on_step=True, on_epoch=False, batch_size=1)
            pl_module.log("perf/data_wait_share", min(1.0, wait / wall), on_step=True, on_epoch=False, batch_size=1)
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "bad_samples"):
            pl_module.log("data/bad_samples", float(datamodule.bad_samples), on_step=True, on_epoch=False, batch_size=1)

    def _open_window(self, trainer: L.Trainer) -> float:
        """Start a window now; returns its start time."""
        self._window_start = time.perf_counter()
        self._wait_start = self._loader_wait(trainer)
        self._reset()
        return self._window_start

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self._window_start is None:
            self._open_window(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        start = self._open_window(trainer) if self._window_start is None else self._window_start
        self._count(trainer, batch)
        if not is_logging_step(trainer, after_optimizer_step=True):
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        wall = time.perf_counter() - start
        self._log(trainer, pl_module, wall, self._loader_wait(trainer) - self._wait_start)
        self._open_window(trainer)
