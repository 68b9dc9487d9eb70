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

from typing import Any

import lightning as L

from ..callbacks.throughput import Throughput


class TokenThroughput(Throughput):
    """:class:`~img_lightning.callbacks.throughput.Throughput`'s window and data wait, counting the
    finetune's tokens and padded slots (device tensors until a logging step: no sync per batch)."""

    def _reset(self) -> None:
        self._tokens: Any = 0
        self._slots = 0
        self._samples: Any = 0

    def _count(self, trainer: L.Trainer, batch: Any) -> None:
        mask = batch["attention_mask"]
        self._tokens = self._tokens + mask.sum()
        self._slots += int(mask.numel())
        self._samples = self._samples + batch["num_real"] * trainer.world_size

    def _log(self, trainer: L.Trainer, pl_module: Any, wall: float, wait: float) -> None:
        if wall <= 0:
            return
        tokens, samples = float(self._tokens), float(self._samples)
        log = dict(on_step=True, on_epoch=False, batch_size=1)
        pl_module.log("perf/tokens_per_s_per_device", tokens / wall, **log)
        pl_module.log("perf/samples_per_s", samples / wall, **log)
        pl_module.log("perf/padding_share", 1.0 - tokens / max(1, self._slots), **log)
        pl_module.log("perf/data_wait_share", min(1.0, wait / wall), **log)
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "samples_skipped"):
            pl_module.log("data/skipped", float(datamodule.samples_skipped), **log)
