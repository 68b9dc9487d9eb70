"""Tokens/s per device, padding share and data wait of the finetuning loop.

Why not Lightning's ``ThroughputMonitor``: it synchronises the GPU after every batch and cannot see
the padding or the time spent blocked on the loader. This callback counts the real (attention-mask)
tokens and the padded slots of every batch on its rank, synchronises only at logging steps, and
logs over the window since the previous logging step:

* ``perf/tokens_per_s_per_device`` - real tokens (image tokens included) this rank processed per second;
* ``perf/samples_per_s`` - real samples per second, all ranks;
* ``perf/padding_share`` - padded slots / all slots (right padding to the longest sample);
* ``perf/data_wait_share`` - wall time the loop was blocked on the loader;
* ``data/skipped`` - samples dropped so far on this rank (corrupt image, over-long, ...).
"""

from __future__ import annotations

import time
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ..log_steps import is_logging_step


class TokenThroughput(Callback):
    def __init__(self) -> None:
        self._start: Optional[float] = None
        self._wait0 = 0.0
        self._tokens: Any = 0  # device tensors between logging steps: no sync per batch
        self._slots = 0
        self._samples: Any = 0

    @staticmethod
    def _wait(trainer: L.Trainer) -> float:
        loader = getattr(getattr(trainer, "datamodule", None), "train_loader", None)
        return float(getattr(loader, "wait_seconds", 0.0))

    def _open(self, trainer: L.Trainer) -> None:
        self._start = time.perf_counter()
        self._wait0 = self._wait(trainer)
        self._tokens = self._slots = self._samples = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self._start is None:
            self._open(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._start is None:
            self._open(trainer)
        mask = batch["attention_mask"]
        self._tokens = self._tokens + mask.sum()
        self._slots += int(mask.numel())
        self._samples = self._samples + batch["num_real"] * trainer.world_size
        if not is_logging_step(trainer, after_optimizer_step=True):
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        wall = time.perf_counter() - self._start
        tokens, samples = float(self._tokens), float(self._samples)
        if wall > 0:
            log = dict(on_step=True, on_epoch=False, batch_size=1)
            pl_module.log("perf/tokens_per_s_per_device", tokens / wall, **log)
            pl_module.log("perf/samples_per_s", samples / wall, **log)
            pl_module.log("perf/padding_share", 1.0 - tokens / max(1, self._slots), **log)
            pl_module.log("perf/data_wait_share", min(1.0, (self._wait(trainer) - self._wait0) / wall), **log)
            datamodule = getattr(trainer, "datamodule", None)
            if datamodule is not None and hasattr(datamodule, "samples_skipped"):
                pl_module.log("data/skipped", float(datamodule.samples_skipped), **log)
        self._open(trainer)
