"""Samples/s and the share of wall time spent waiting for data (DESIGN §3: training is I/O bound)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ..log_steps import is_logging_step


class Throughput(Callback):
    """Logs ``perf/samples_per_s`` (global, all ranks), ``perf/data_wait_share`` and ``data/bad_samples``
    over the window since the previous logging step.

    Data wait = time from the end of one training batch to the start of the next (fetching and
    host-to-device transfer); compute = the batch itself. On CUDA the device is synchronised once per
    logging window, so asynchronous kernels are charged to compute rather than to data.
    """

    def __init__(self) -> None:
        self._reset()
        self._last_end: float | None = None
        self._batch_start = 0.0

    def _reset(self) -> None:
        self.wait = 0.0
        self.compute = 0.0
        self.samples = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._last_end = None  # do not charge epoch-boundary work (worker start-up) to data

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self.wait += now - self._last_end
        self._batch_start = now

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        log_now = is_logging_step(trainer)
        if log_now and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now = time.perf_counter()
        self.compute += now - self._batch_start
        self.samples += int(batch["ip_lose"].shape[0]) * trainer.world_size
        self._last_end = now
        if not log_now:
            return
        total = self.wait + self.compute
        if total > 0:
            pl_module.log("perf/samples_per_s", self.samples / total, on_step=True, on_epoch=False, batch_size=1)
            pl_module.log("perf/data_wait_share", self.wait / total, on_step=True, on_epoch=False, batch_size=1)
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "bad_samples"):
            pl_module.log("data/bad_samples", float(datamodule.bad_samples), on_step=True, on_epoch=False, batch_size=1)
        self._reset()
