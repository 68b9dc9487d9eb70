"""Counts summed over the ranks at every optimizer step, and the bad-share rule both stages stop on.

Each rank notes what its training micro-batches read and found unusable; at every optimizer step
(:class:`SettleAtStep`, before the update) the ranks add up what they noted since the last step with
one all-reduce of a few integers, so the totals, and every decision taken on them, are the same on
every rank: all ranks stop at the same step (one rank raising alone would leave the others waiting
in the next collective), and the checkpoint, written after the step, holds the totals of every batch
it has trained on.

``data.max_bad_fraction`` bounds the share of unusable samples among the samples the run reads
(each pass over the data reads, and counts, its samples again). Before the end of an epoch that share
is not known yet, but a lower bound is (:func:`bad_share_bound`): ``bad / max(read, planned)``, with
``planned`` what the run will have read by the end of the current epoch (or of the run, when it ends
first). It only reaches the true share at the end of the epoch, so a run within the limit is never
stopped, and one above it stops as soon as the counts prove it, from the first step.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.optim import Optimizer

from .resumable import AllSum, ResumableDataModule


def strategy_sum(trainer: L.Trainer, device: torch.device) -> AllSum:
    """Element-wise sum over ranks through the trainer's strategy (identity on one process)."""

    def all_sum(values: list[int]) -> list[int]:
        if trainer.world_size <= 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.long, device=device)
        return [int(v) for v in trainer.strategy.reduce(tensor, reduce_op="sum").tolist()]

    return all_sum


def bad_share_bound(bad: int, read: int, planned: int) -> float:
    """A lower bound of the unusable share of what the run reads (see the module doc)."""
    return bad / max(1, read, planned)


class SettleAtStep(Callback):
    """At each optimizer step, before the update: the DataModule adds every rank's counts since the
    last step and applies its rules (``settle_step``); :meth:`settled` gets the step's value back."""

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        datamodule = getattr(trainer, "datamodule", None)  # set by Trainer.fit, not declared on Trainer
        assert isinstance(datamodule, ResumableDataModule), "SettleAtStep needs the stage's DataModule"
        value = datamodule.settle_step(strategy_sum(trainer, pl_module.device))
        self.settled(trainer, pl_module, value)

    def settled(self, trainer: L.Trainer, pl_module: L.LightningModule, value: int) -> None:
        """What a stage does with the value its DataModule's ``settle_step`` returned."""
