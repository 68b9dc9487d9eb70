"""One job assembly for both training stages (``img-train``, ``img-finetune-mllm train``).

What every stage's job does the same way lives here: the run directory (resume choice, the resume
config check, ``run_info.json``, the one-run lock), the Trainer (atomic checkpoints, Lightning's SLURM
environment without its mid-step auto-requeue, our data sharding), the callbacks every run has
(gradient norm, progress bar, learning rate, ``last.ckpt``, SLURM requeue), TensorBoard, fit, the
early return of a requeued run, the final validation and the run's hparams. A :class:`Stage` plugs in
what differs: its DataModule and module, its own callbacks, strategy and gradient accumulation, its
checks after fit, and what it writes at the end (the export).
"""

from __future__ import annotations

import logging
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Optional, TypeVar

import lightning as L
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import Strategy

from .callbacks.progress import progress_bar
from .callbacks.requeue import RequeueOnSignal, slurm_requeue_callback
from .callbacks.tensorboard import GradNorm, RunTensorBoardLogger, log_run_hparams
from .checkpoint_io import AtomicCheckpointIO
from .config.changes import describe_changes
from .config.stages import StageConfig
from .data.resumable import ResumableDataModule
from .run_dir import check_resume_config, lightning_root, resolve_resume, run_directory, write_run_info
from .run_lock import run_locked, take_run_lock
from .weights_guard import check_weights_unchanged, weights_fingerprint

log = logging.getLogger(__name__)

# Our loader position lives in the DataModule's checkpointed state (see data/resumable.py), which
# Lightning's "dataloader is not resumable" heuristic does not know about; and resuming into the same
# checkpoint directory is the point of run.ckpt_path=last (resolve_resume refuses accidental reuse).
warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended.*")
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
# Raised inside Lightning's own pytree helper with torch >= 2.10; nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


@dataclass
class JobResult:
    """What every stage's job returns; a stage's result type adds its own fields."""

    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    is_global_zero: bool = True
    requeued_at: Optional[int] = None  # the step saved when SLURM's time-limit signal stopped the run


R = TypeVar("R", bound=JobResult)
DM = TypeVar("DM", bound=ResumableDataModule[Any])
M = TypeVar("M", bound=L.LightningModule)


@dataclass
class Job(Generic[StageConfig, DM, M]):
    """One running job, as the stage's hooks see it: the stage's config, DataModule and module."""

    cfg: StageConfig
    run_dir: Path
    ckpt_path: Optional[str]
    datamodule: DM
    module: M
    trainer: L.Trainer
    callbacks: list[Callback]
    logger: RunTensorBoardLogger


class Stage(ABC, Generic[StageConfig, DM, M, R]):
    """What one training stage plugs into :func:`run_job`: for its config schema, the DataModule and
    module it builds and the result it returns."""

    command: str  # names the job in the run lock ("img-train")
    schema: type[StageConfig]  # the config dataclass a resume's config is compared in
    result_type: type[R]

    @abstractmethod
    def resume_free_keys(self, cfg: StageConfig) -> frozenset[str]:
        """Config keys that may change on resume."""

    @abstractmethod
    def datamodule(self, cfg: StageConfig, run_dir: Path) -> DM:
        """The DataModule; checks what it can of its inputs now, before models or DDP processes exist."""

    @abstractmethod
    def module(self, cfg: StageConfig) -> M: ...

    @abstractmethod
    def callbacks(self, cfg: StageConfig, run_dir: Path) -> list[Callback]:
        """The stage's callbacks, with :func:`standard_callbacks` where they belong in its order."""

    def strategy(self, cfg: StageConfig) -> str | Strategy:
        return cfg.trainer.strategy

    def accumulation(self, cfg: StageConfig, world_size: int) -> int:
        """Gradient accumulation, once the number of processes is known."""
        return int(cfg.trainer.accumulate_grad_batches)

    def run_info(self, trainer: L.Trainer) -> dict[str, Any]:
        """What ``run_info.json`` records besides the resume point and the world size."""
        return {}

    def after_fit(self, job: Job[StageConfig, DM, M]) -> None:
        """Checks on a fit that finished (not on one stopped for a requeue)."""

    @abstractmethod
    def validates(self, job: Job[StageConfig, DM, M]) -> bool:
        """Whether the finished run is validated once more (its final metrics)."""

    @abstractmethod
    def finish(self, job: Job[StageConfig, DM, M], result: R) -> None:
        """The end of a finished run: exports, summaries (every rank calls it)."""


def parse_devices(value: object) -> str | int | list[int]:
    text = str(value).strip()
    if text == "auto":
        return "auto"
    if text.startswith("["):
        return [int(x) for x in text.strip("[]").split(",") if x.strip()]
    return int(text)


def apply_torch_threads(n: Optional[int]) -> None:
    """``run.torch_threads``: torch's intra-op threads for this process (None leaves torch's default)."""
    if n:
        import torch

        torch.set_num_threads(int(n))


def build_trainer(cfg: StageConfig, run_dir: Path, callbacks: Sequence[Callback] = (),
                  logger: Logger | bool = False, strategy: str | Strategy | None = None) -> L.Trainer:
    """The Trainer for ``cfg`` (``strategy``: None for ``cfg.trainer.strategy``). Under SLURM
    (``srun``), Lightning's SLURM environment without its auto-requeue, which saves inside the signal
    handler, mid-step (with gradient accumulation: accumulated gradients lost, their batches counted
    as done): :class:`RequeueOnSignal` saves at an optimizer-step boundary and requeues instead."""
    t = cfg.trainer
    plugins: list[Any] = [AtomicCheckpointIO()]  # same-directory atomic checkpoints, plain errors
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return L.Trainer(
        accelerator=t.accelerator,
        devices=parse_devices(t.devices),
        num_nodes=t.num_nodes,
        strategy=t.strategy if strategy is None else strategy,
        precision=t.precision,  # type: ignore[arg-type]  # a str, checked against Lightning's names at load
        max_steps=t.max_steps,
        max_epochs=t.max_epochs,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=cfg.optim.grad_clip,
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches,
        deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar,
        default_root_dir=str(lightning_root(run_dir)),  # not the run directory: see lightning_root
        logger=logger,
        callbacks=list(callbacks),
        plugins=plugins,
        # The DataModules shard data over ranks themselves; Lightning must not wrap a DistributedSampler.
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
    )


def standard_callbacks(cfg: StageConfig, run_dir: Path) -> list[Callback]:
    """The callbacks every training run has: gradient norm, progress bar, learning rate, and
    ``last.ckpt`` every ``trainer.checkpoint_every_n_steps`` optimizer steps (what exact resume
    restarts from)."""
    return [
        GradNorm(),
        *progress_bar(cfg.trainer),
        LearningRateMonitor(logging_interval="step"),
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step:08d}", auto_insert_metric_name=False,
                        every_n_train_steps=cfg.trainer.checkpoint_every_n_steps, save_top_k=0, save_last=True),
    ]


@run_locked
def run_job(cfg: StageConfig, stage: Stage[StageConfig, DM, M, R], extra_callbacks: Sequence[Callback] = ()) -> R:
    """Fit, validate, finish. Returns the final metrics (rank 0 has them all)."""
    apply_torch_threads(cfg.run.torch_threads)
    run_dir = run_directory(cfg.run)
    ckpt_path = resolve_resume(run_dir, cfg.run.ckpt_path)
    changes = check_resume_config(run_dir, cfg, stage.schema, stage.resume_free_keys(cfg)) if ckpt_path else {}
    datamodule = stage.datamodule(cfg, run_dir)  # before models, DDP processes or the run directory exist
    module = stage.module(cfg)
    logger = RunTensorBoardLogger(run_dir)
    requeue: Optional[RequeueOnSignal] = slurm_requeue_callback(run_dir)
    # last, after the callbacks whose state it saves (Lightning moves ModelCheckpoint after it)
    callbacks = stage.callbacks(cfg, run_dir) + list(extra_callbacks) + ([requeue] if requeue else [])
    trainer = build_trainer(cfg, run_dir, callbacks, logger, strategy=stage.strategy(cfg))
    trainer.accumulate_grad_batches = stage.accumulation(cfg, trainer.world_size)
    take_run_lock(run_dir, stage.command, trainer.global_rank)  # held until this returns
    if trainer.is_global_zero:
        write_run_info(run_dir, cfg, {"resumed_from": ckpt_path, "world_size": trainer.world_size,
                                      **stage.run_info(trainer)},
                       resumed=ckpt_path is not None, changes=changes)
        if changes:
            log.info("resuming with config changes (recorded under %s/resumes):\n%s", run_dir,
                     describe_changes(changes))
        log.info("run directory: %s", run_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    job = Job(cfg, run_dir, ckpt_path, datamodule, module, trainer, callbacks, logger)

    result = stage.result_type(run_dir=run_dir, is_global_zero=trainer.is_global_zero)
    if requeue is not None and requeue.requeued_at is not None:
        result.requeued_at = requeue.requeued_at  # the requeued job continues; nothing final yet
        requeue.requeue_job(trainer)  # the last thing this job does (SLURM ends it)
        return result
    stage.after_fit(job)
    trained = weights_fingerprint(module)  # what training ended with: the export must hold exactly this
    if stage.validates(job):
        validated = trainer.validate(module, datamodule=datamodule, verbose=False)
        result.metrics = {k: float(v) for k, v in (validated[0] if validated else {}).items()}
        check_weights_unchanged(module, trained, "the final validation")
    if trainer.is_global_zero:
        log_run_hparams(logger, cfg, result.metrics, trainer.global_step)
    stage.finish(job, result)
    return result
