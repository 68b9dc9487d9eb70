"""Assemble and run a training job from a resolved :class:`~img_lightning.config.train.TrainConfig`."""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment

from .aligner import ImplicitAligner
from .callbacks import ReferenceSwap, Throughput
from .callbacks.progress import progress_bar
from .callbacks.requeue import slurm_requeue_callback
from .callbacks.tensorboard import GradNorm, RunTensorBoardLogger, log_run_hparams
from .config.changes import describe_changes
# run-directory safety: atomic checkpoints, one run per directory
from .checkpoint_io import AtomicCheckpointIO
from .run_lock import run_locked, take_run_lock
from .config.loading import ConfigError, load_config, to_container
from .config.train import RESUME_FREE_KEYS, TrainConfig
from .data import ExpectedFeatures, FeatureCacheDataModule
from .module import AlignerModule, aligner_weights_from_checkpoint
from .run_dir import check_resume_config, lightning_root, resolve_resume, run_directory, write_run_info
from .weights_guard import check_weights_unchanged, weights_fingerprint

log = logging.getLogger(__name__)

# Our loader position lives in the DataModule's checkpointed state (see data/datamodule.py), which
# Lightning's "dataloader is not resumable" heuristic does not know about; and resuming into the same
# checkpoint directory is the point of run.ckpt_path=last (resolve_resume refuses accidental reuse).
warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended.*")
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
# Raised inside Lightning's own pytree helper with torch >= 2.10; nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    exports: dict[str, str] = field(default_factory=dict)
    best_checkpoint: Optional[str] = None
    is_global_zero: bool = True
    requeued_at: Optional[int] = None  # the step saved when SLURM's time-limit signal stopped the run


def expected_cache_key(data_cfg: Any) -> str:
    """The key the training cache must carry: from ``data.cache_key`` or the ``data.recipe`` YAML."""
    if data_cfg.cache_key and data_cfg.recipe:
        raise ConfigError("set only one of data.cache_key and data.recipe")
    if data_cfg.cache_key:
        return str(data_cfg.cache_key)
    if data_cfg.recipe:
        from .config.preprocess import PreprocessConfig
        from .recipe import cache_key_of

        recipe_cfg = load_config(PreprocessConfig, [data_cfg.recipe], list(data_cfg.recipe_overrides),
                                 require_complete=False)
        return cache_key_of(recipe_cfg)
    raise ConfigError(
        "data.recipe (the configs/preprocess YAML the cache was made with) or data.cache_key must be set, "
        "so training can refuse a cache made by another recipe"
    )


def resume_free_keys(cfg: Any) -> frozenset[str]:
    """Keys that may change on resume; ``max_steps`` shapes the lr curve of a cosine schedule."""
    if cfg.optim.schedule == "cosine":
        return RESUME_FREE_KEYS - {"trainer.max_steps", "trainer.max_epochs"}
    return RESUME_FREE_KEYS


def planned_world_size(trainer_cfg: Any) -> Optional[int]:
    """Processes the run will have, when the config says (``devices: auto`` leaves it to Lightning)."""
    devices = parse_devices(trainer_cfg.devices)
    if devices == "auto" or (isinstance(devices, int) and devices < 0):
        return None
    return (len(devices) if isinstance(devices, list) else devices) * int(trainer_cfg.num_nodes)


def apply_torch_threads(n: Optional[int]) -> None:
    """``run.torch_threads``: torch's intra-op threads for this process (None leaves torch's default)."""
    if n:
        import torch

        torch.set_num_threads(int(n))


def parse_devices(value: Any) -> Any:
    text = str(value).strip()
    if text == "auto":
        return "auto"
    if text.startswith("["):
        return [int(x) for x in text.strip("[]").split(",") if x.strip()]
    return int(text)


def build_trainer(
    cfg: Any, run_dir: Path, callbacks: Sequence[Callback] = (), logger: Any = False
) -> L.Trainer:
    """The Trainer for ``cfg``. Under SLURM (``srun``), Lightning's SLURM environment without its
    auto-requeue, which saves inside the signal handler, mid-step: :class:`RequeueOnSignal` (added by
    :func:`run_training`) saves at a step boundary and requeues instead."""
    t = cfg.trainer
    plugins: list[Any] = [AtomicCheckpointIO()]  # same-directory atomic checkpoints, plain errors
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return L.Trainer(
        accelerator=t.accelerator,
        devices=parse_devices(t.devices),
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
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
        plugins=plugins or None,
        # The DataModule shards data over ranks itself; Lightning must not wrap a DistributedSampler.
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
    )


def build_module(cfg: Any) -> AlignerModule:
    return AlignerModule(cfg.model, cfg.objective, cfg.reference, cfg.optim, seed=cfg.run.seed)


def build_datamodule(cfg: Any) -> FeatureCacheDataModule:
    expected = ExpectedFeatures(
        cache_key=expected_cache_key(cfg.data),
        guidance_dim=cfg.model.guidance_dim,
        ip_tokens=cfg.model.num_tokens,
        ip_dim=cfg.model.dim,
    )
    return FeatureCacheDataModule(cfg.data, expected)


def build_callbacks(cfg: Any, run_dir: Path) -> list[Callback]:
    t = cfg.trainer
    return [
        ReferenceSwap(patience=cfg.reference.patience, log_dir=run_dir / "reference_swaps"),
        Throughput(),
        GradNorm(),
        *progress_bar(t),
        LearningRateMonitor(logging_interval="step"),
        # `last.ckpt` every N optimizer steps: what exact resume restarts from.
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="step{step:08d}",
            auto_insert_metric_name=False,
            every_n_train_steps=t.checkpoint_every_n_steps,
            save_top_k=0,
            save_last=True,
        ),
        # Best by validation distance to the winners, checked after each validation.
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="best-step{step:08d}",
            auto_insert_metric_name=False,
            monitor="val/base",
            mode="min",
            save_top_k=1,
            save_last=False,
            save_on_train_epoch_end=False,
        ),
    ]


def export_aligner(aligner: ImplicitAligner, out_dir: Path, stem: str, info: dict) -> dict[str, str]:
    """Official ``.pth`` layout (loads in the IMG demo) + safetensors + a JSON of dims."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pth = aligner.save_official(out_dir / f"{stem}.pth")
    st = aligner.save_safetensors(out_dir / f"{stem}.safetensors")
    (out_dir / f"{stem}.json").write_text(json.dumps({**aligner.dims, **info}, indent=1) + "\n")
    return {f"{stem}.pth": str(pth), f"{stem}.safetensors": str(st)}


@run_locked
def run_training(cfg: Any, extra_callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Fit, validate, export. Returns the final validation metrics (rank 0 has them all)."""
    apply_torch_threads(cfg.run.torch_threads)
    run_dir = run_directory(cfg.run)
    ckpt_path = resolve_resume(run_dir, cfg.run.ckpt_path)
    changes = check_resume_config(run_dir, cfg, TrainConfig, resume_free_keys(cfg)) if ckpt_path else {}
    datamodule = build_datamodule(cfg)
    datamodule.open_caches()  # before models, DDP processes or the run directory exist
    world = planned_world_size(cfg.trainer)
    if world is not None:
        datamodule.check_fits(world)
    module = build_module(cfg)
    logger = RunTensorBoardLogger(run_dir)
    requeue = slurm_requeue_callback(run_dir)
    # last, after the callbacks whose state it saves (Lightning moves ModelCheckpoint after it)
    callbacks = build_callbacks(cfg, run_dir) + list(extra_callbacks) + ([requeue] if requeue else [])
    trainer = build_trainer(cfg, run_dir, callbacks, logger)
    take_run_lock(run_dir, "img-train", trainer.global_rank)  # held until this returns
    if trainer.is_global_zero:
        write_run_info(run_dir, cfg, {"resumed_from": ckpt_path, "world_size": trainer.world_size},
                       resumed=ckpt_path is not None, changes=changes)
        if changes:
            log.info("resuming with config changes (recorded under %s/resumes):\n%s", run_dir,
                     describe_changes(changes))
        log.info("run directory: %s", run_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    result = TrainResult(run_dir=run_dir, is_global_zero=trainer.is_global_zero)
    if requeue is not None and requeue.requeued_at is not None:
        result.requeued_at = requeue.requeued_at  # the requeued job continues; nothing final yet
        requeue.requeue_job(trainer)  # the last thing this job does (SLURM ends it)
        return result
    trained = weights_fingerprint(module)
    if datamodule.val_ids is not None:
        validated = trainer.validate(module, datamodule=datamodule, verbose=False)
        result.metrics = {k: float(v) for k, v in (validated[0] if validated else {}).items()}
        check_weights_unchanged(module, trained, "the final validation")
    if trainer.is_global_zero:
        log_run_hparams(logger, cfg, result.metrics, trainer.global_step)
    best = next(
        (c.best_model_path for c in callbacks if isinstance(c, ModelCheckpoint) and c.monitor and c.best_model_path),
        None,
    )
    result.best_checkpoint = best or None
    if cfg.run.export and trainer.is_global_zero:
        info = {"cache_key": datamodule.train_view.manifest.cache_key, "passes": cfg.model.passes,
                "global_step": trainer.global_step, "config": to_container(cfg)}
        result.exports = export_aligner(module.aligner, run_dir / "export", "aligner", info)
        if best:
            best_aligner = ImplicitAligner(**module.aligner.dims)
            best_aligner.load_state_dict(aligner_weights_from_checkpoint(best))
            result.exports.update(export_aligner(best_aligner, run_dir / "export", "aligner_best", info))
    return result
