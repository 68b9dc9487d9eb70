"""The training progress bar in optimizer steps of the run, not in batches of an epoch.

A run is ``trainer.max_steps`` optimizer steps (or the steps its ``max_epochs`` make), over as many
passes over the data as they take; Lightning's default bar counts the batches of the current epoch
and prints ``Epoch 49/-2`` when ``max_epochs`` is -1. :class:`StepProgressBar` is one bar for the
whole run: ``steps 1200/2000``, starting at the checkpoint's step on a resume, with the epoch and
the logged progress-bar metrics beside it. It is a ``tqdm`` bar, readable in SLURM logs too.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

from ..config.stages import TrainerBlock


def run_steps(trainer: L.Trainer) -> Optional[int]:
    """Optimizer steps of the whole run: ``max_steps``, else what ``max_epochs`` make (None: unknown)."""
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    total = trainer.estimated_stepping_batches
    return int(total) if total is not None and math.isfinite(total) else None


class StepProgressBar(TQDMProgressBar):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=run_steps(trainer))
        bar.initial = bar.n = trainer.global_step  # a resumed run goes on from its checkpoint's step
        bar.set_description("steps")
        bar.refresh()

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        """Nothing: the bar spans the run, not an epoch."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        bar = self.train_progress_bar
        if bar is not None and not bar.disable and step != bar.n and self._should_update(step, bar.total or 0):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return {"epoch": trainer.current_epoch, **metrics}


def progress_bar(trainer_cfg: TrainerBlock) -> list[Callback]:
    """The bar for a job's callbacks: ours when ``trainer.enable_progress_bar``, none otherwise."""
    return [StepProgressBar()] if trainer_cfg.enable_progress_bar else []
