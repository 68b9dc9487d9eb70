"""What TensorBoard gets beyond the metrics the modules log: the gradient norm before clipping, and
the run's hyper-parameters with its final validation metrics (the HParams dashboard).

:class:`GradNorm` logs ``train/grad_norm``, the global 2-norm of the gradients as the optimizer
step sees them, before ``optim.grad_clip`` clips them (Lightning calls ``on_before_optimizer_step``
before clipping, with mixed-precision gradients already unscaled), on logging steps only. Under
FSDP each rank holds a shard of the gradients: the squares are summed over the ranks.

:func:`log_run_hparams` writes the flattened run config and the final validation metrics (as
``final/<metric>`` scalars at the last step) into the run's own event file, through the logger's
writer: one event file per run (``SummaryWriter.add_hparams`` would start a second one), kept open
from ``fit`` to the final validation by :class:`RunTensorBoardLogger`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_only

from ..config.changes import flatten
from ..config.finetune_mllm import FinetuneMLLMConfig
from ..config.loading import to_container
from ..config.train import TrainConfig
from ..log_steps import is_logging_step


def gradient_norm(module: L.LightningModule, trainer: L.Trainer) -> torch.Tensor:
    """The global 2-norm of ``module``'s gradients (summed over FSDP's shards)."""
    squares = [p.grad.detach().float().pow(2).sum() for p in module.parameters() if p.grad is not None]
    total = torch.stack(squares).sum() if squares else torch.zeros((), device=module.device)
    if isinstance(trainer.strategy, FSDPStrategy):
        total = trainer.strategy.reduce(total, reduce_op="sum")
    return total.sqrt()


class GradNorm(Callback):
    """``train/grad_norm`` before clipping, on Lightning's logging steps."""

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if is_logging_step(trainer):
            pl_module.log("train/grad_norm", gradient_norm(pl_module, trainer), on_step=True, on_epoch=False,
                          batch_size=1)


class RunTensorBoardLogger(TensorBoardLogger):
    """``RUN/tensorboard/``, one event file per run. Lightning closes the writer at the end of ``fit``
    and of ``validate``, and the next write (the final validation, the hyper-parameters) would open
    a new event file: here the end of a stage only flushes, and :meth:`close` closes."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._experiment is not None:
            self.experiment.flush()
        if status == "success":
            self.save()

    def close(self) -> None:
        super().finalize("success")


def _hparam_value(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value)


def log_run_hparams(logger: RunTensorBoardLogger, cfg: TrainConfig | FinetuneMLLMConfig, metrics: Mapping[str, float],
                    step: int) -> None:
    """The run's config (dotted keys) and final ``metrics`` in the HParams dashboard (rank 0); the
    run's last write to its event file, which is then closed."""
    from torch.utils.tensorboard.summary import hparams

    params = {k: _hparam_value(v) for k, v in flatten(to_container(cfg)).items()}
    final = {f"final/{k}": float(v) for k, v in metrics.items()}
    writer = logger.experiment._get_file_writer()  # the run's own event file
    for summary in hparams(params, final):
        writer.add_summary(summary)
    if final:
        logger.log_metrics(final, step)
    logger.close()
