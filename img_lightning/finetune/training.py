"""Assemble and run an MLLM finetuning job from a resolved ``FinetuneMLLMConfig``.

Same run-directory contract as ``img-train``: ``{run.root}/{run.name}`` without a timestamp (the
same on every rank and across SLURM requeues) holding ``config.yaml`` + ``run_info.json`` (git SHA,
versions, command), ``samples.parquet`` (every triplet's key, location, split and question index),
``tensorboard/``, ``checkpoints/last.ckpt`` (a directory with FSDP's sharded checkpoints),
``skipped/rank*.jsonl``, ``summary.json`` and, at the end, ``export/``. A resume
(``run.ckpt_path=last``) must be the same run: the config is compared with the saved one, and the
data fingerprint, world size and batch size with the checkpoint's.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment

from ..atomic import atomic_write_json
from ..callbacks.progress import progress_bar
from ..callbacks.requeue import slurm_requeue_callback
from ..callbacks.tensorboard import GradNorm, RunTensorBoardLogger, log_run_hparams
from ..config.changes import describe_changes
# run-directory safety: atomic checkpoints, one run per directory
from ..checkpoint_io import AtomicCheckpointIO
from ..run_lock import run_locked, take_run_lock
from ..config.finetune_mllm import FinetuneMLLMConfig, resume_free_keys
from ..config.loading import ConfigError, to_container
from ..run_dir import (check_resume_config, git_revision, lightning_root, resolve_resume, run_directory,
                       write_run_info)
from ..training import apply_torch_threads, parse_devices
from ..weights_guard import check_weights_unchanged, weights_fingerprint
from .datamodule import EditTripletDataModule, skip_summary
from .module import MLLMFinetuneModule
from .accounting import StepAccounting, trained_summary  # (with .provenance: what a checkpoint records)
from .provenance import RunRecord
from .strategy import build_strategy
from .throughput import TokenThroughput

log = logging.getLogger(__name__)

# Lightning's resume and pytree warnings are silenced by ..training (imported above), as for img-train.
# The frozen vision tower is deliberately kept in eval mode (see model.py).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


@dataclass
class FinetuneResult:
    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    export_dir: Optional[Path] = None
    summary: dict[str, Any] = field(default_factory=dict)
    is_global_zero: bool = True
    requeued_at: Optional[int] = None  # the step saved when SLURM's time-limit signal stopped the run


def _value(x: Any) -> str:
    return str(getattr(x, "value", x))


def accumulation(cfg: Any, world_size: int) -> int:
    """Gradient accumulation: from ``data.global_batch_size`` when set (must divide exactly)."""
    global_batch = cfg.data.global_batch_size
    if global_batch is None:
        return int(cfg.trainer.accumulate_grad_batches)
    per_step = int(cfg.data.batch_size) * world_size
    if global_batch % per_step:
        raise ConfigError(f"data.global_batch_size={global_batch} is not a multiple of data.batch_size x ranks = "
                          f"{cfg.data.batch_size} x {world_size}; change data.batch_size or the number of GPUs")
    return global_batch // per_step


def build_trainer(cfg: Any, run_dir: Path, callbacks: Sequence[Callback] = (), logger: Any = False) -> L.Trainer:
    """The Trainer; under SLURM (``srun``) Lightning's SLURM environment without its auto-requeue,
    which saves mid-step (with gradient accumulation: accumulated gradients lost, their batches
    counted as done): :class:`RequeueOnSignal` saves at an optimizer-step boundary instead."""
    t = cfg.trainer
    plugins = [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []
    plugins.append(AtomicCheckpointIO())  # same-directory atomic checkpoints, plain errors
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=parse_devices(t.devices), num_nodes=t.num_nodes,
        strategy=build_strategy(cfg), precision=t.precision, max_steps=t.max_steps, max_epochs=t.max_epochs,
        gradient_clip_val=cfg.optim.grad_clip, log_every_n_steps=t.log_every_n_steps,
        val_check_interval=t.val_check_interval, check_val_every_n_epoch=None, limit_val_batches=t.limit_val_batches,
        deterministic=t.deterministic, enable_progress_bar=t.enable_progress_bar,
        default_root_dir=str(lightning_root(run_dir)),  # not the run directory: see lightning_root
        logger=logger, callbacks=list(callbacks), plugins=plugins or None,
        use_distributed_sampler=False,  # the DataModule shards the data itself
        num_sanity_val_steps=0,
    )
    trainer.accumulate_grad_batches = accumulation(cfg, trainer.world_size)
    return trainer


def build_callbacks(cfg: Any, run_dir: Path) -> list[Callback]:
    return [
        StepAccounting(),  # global read/skipped/trained counts, the bad-fraction rule, empty steps
        RunRecord(cfg),  # the config and base-model identity in every checkpoint
        TokenThroughput(),
        GradNorm(),
        *progress_bar(cfg.trainer),
        LearningRateMonitor(logging_interval="step"),
        # `last.ckpt` every N optimizer steps: what exact resume restarts from.
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step:08d}", auto_insert_metric_name=False,
                        every_n_train_steps=cfg.trainer.checkpoint_every_n_steps, save_top_k=0, save_last=True),
    ]


def config_sha256(folder: Path) -> Optional[str]:
    path = Path(folder) / "config.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def export_manifest(cfg: Any, datamodule: EditTripletDataModule, global_step: int, world_size: int,
                    accumulate: int, metrics: dict[str, float]) -> dict[str, Any]:
    """Everything that identifies what the export learnt from (recorded in ``img_finetune.json``)."""
    import lightning
    import torch
    import transformers

    from ..encoders.conversation import resolve_format
    from ..encoders.mllm import mllm_folder

    encoder = datamodule.encoder
    index = datamodule.index
    assert encoder is not None and index is not None
    folder = mllm_folder(cfg.mllm, key="mllm")
    global_batch = int(cfg.data.batch_size) * int(world_size) * int(accumulate)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "lightning": lightning.__version__}
    try:
        import peft

        versions["peft"] = peft.__version__
    except ImportError:
        pass
    return {
        "base": {"backend": str(cfg.mllm.backend), "model": str(cfg.mllm.model), "revision": cfg.mllm.revision,
                 "path": str(folder), "config_sha256": config_sha256(folder)},
        "data": {"dataset": cfg.data.dataset, "fingerprint": index.fingerprint, "rows_read": index.stats.rows_read,
                 "train_samples": int(len(datamodule.train_ids)), "heldout_samples": index.stats.heldout,
                 "heldout_fraction": cfg.data.heldout_fraction, "heldout_salt": cfg.data.heldout_salt,
                 "limit": cfg.data.limit},
        "questions": {"name": encoder.questions.name, "sha256": encoder.questions.sha256,
                      "count": len(encoder.questions), "file": encoder.questions.path},
        "conversation": {"prompt_format": resolve_format(cfg.mllm.prompt_format, str(cfg.mllm.backend)).value,
                         "image_mode": str(cfg.mllm.image_mode), "max_length": int(cfg.data.max_length)},
        "recipe": {"finetune": to_container(cfg.finetune), "optim": to_container(cfg.optim),
                   "precision": str(cfg.trainer.precision), "strategy": _value(cfg.trainer.strategy),
                   "global_batch_size": global_batch, "max_epochs": cfg.trainer.max_epochs,
                   "max_steps": cfg.trainer.max_steps, "seed": int(cfg.run.seed), "data_seed": int(cfg.data.seed)},
        # samples_seen: samples of steps that trained (a batch whose every sample was unusable is none)
        "training": {"global_step": int(global_step), "samples_seen": datamodule.counts.trained,
                     **trained_summary(datamodule.counts), "val_loss": metrics.get("val/loss")},
        "provenance": {"git": git_revision(), **versions},
    }


def export_trained(cfg: Any, module: MLLMFinetuneModule, datamodule: EditTripletDataModule, trainer: L.Trainer,
                   metrics: dict[str, float], out_dir: Path) -> Optional[Path]:
    """Write the export (rank 0; under FSDP every rank helps gather the weights)."""
    from transformers import AutoProcessor

    from ..encoders.mllm import mllm_folder
    from .export import export_model, full_state_dict_fsdp, plain_model

    if module.sharded:  # every rank takes part in gathering the shards; rank 0 gets the full weights
        state = full_state_dict_fsdp(trainer.strategy.model)
        model = plain_model(module.core.config, module.backend, state) if state is not None else None
    else:
        model = module.model if trainer.is_global_zero else None  # a LoRA model is merged by export_model
    if not trainer.is_global_zero:
        return None
    processor = AutoProcessor.from_pretrained(mllm_folder(cfg.mllm, key="mllm"))
    manifest = export_manifest(cfg, datamodule, trainer.global_step, trainer.world_size,
                               trainer.accumulate_grad_batches, metrics)
    record = next((c for c in trainer.callbacks if isinstance(c, RunRecord) and c.base), None)
    if record is not None:
        manifest["base"]["weights_sha256"] = record.base["sha256"]
    path = export_model(model, processor, out_dir, manifest, dtype=str(cfg.run.export_dtype),
                        check_batch=datamodule.check_batch())
    log.info("exported the finetuned MLLM to %s", path)
    return path


@run_locked
def run_finetune(cfg: Any, extra_callbacks: Sequence[Callback] = ()) -> FinetuneResult:
    """Fit, measure the held-out loss, export. Returns the final metrics (rank 0 has them all)."""
    apply_torch_threads(cfg.run.torch_threads)
    run_dir = run_directory(cfg.run)
    ckpt_path = resolve_resume(run_dir, cfg.run.ckpt_path)
    changes = check_resume_config(run_dir, cfg, FinetuneMLLMConfig, resume_free_keys(cfg)) if ckpt_path else {}
    datamodule = EditTripletDataModule(cfg.data, cfg.mllm, skip_dir=run_dir / "skipped",
                                       progress=bool(cfg.trainer.enable_progress_bar),
                                       record_path=run_dir / "samples.parquet")
    module = MLLMFinetuneModule(cfg.mllm, cfg.finetune, cfg.optim, strategy=_value(cfg.trainer.strategy),
                                seed=cfg.run.seed)
    logger = RunTensorBoardLogger(run_dir)
    requeue = slurm_requeue_callback(run_dir)
    callbacks = build_callbacks(cfg, run_dir) + list(extra_callbacks) + ([requeue] if requeue else [])
    trainer = build_trainer(cfg, run_dir, callbacks, logger)
    take_run_lock(run_dir, "img-finetune-mllm train", trainer.global_rank)  # held until this returns
    if trainer.is_global_zero:
        write_run_info(run_dir, cfg, {"resumed_from": ckpt_path, "world_size": trainer.world_size,
                                      "accumulate_grad_batches": trainer.accumulate_grad_batches},
                       resumed=ckpt_path is not None, changes=changes)
        if changes:
            log.info("resuming with config changes (recorded under %s/resumes):\n%s", run_dir, describe_changes(changes))
        log.info("run directory: %s", run_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if requeue is None or requeue.requeued_at is None:
        datamodule.check_trained()  # no trained sample: an error, never an export of the base model

    result = FinetuneResult(run_dir=run_dir, is_global_zero=trainer.is_global_zero)
    if requeue is not None and requeue.requeued_at is not None:
        result.requeued_at = requeue.requeued_at  # the requeued job continues; nothing final yet
        requeue.requeue_job(trainer)  # the last thing this job does (SLURM ends it)
        return result
    trained = weights_fingerprint(module)
    if datamodule.val_ids is not None and len(datamodule.val_ids) and cfg.trainer.limit_val_batches > 0:
        validated = trainer.validate(module, datamodule=datamodule, verbose=False)
        result.metrics = {k: float(v) for k, v in (validated[0] if validated else {}).items()}
        check_weights_unchanged(module, trained, "the final validation")
    if trainer.is_global_zero:
        log_run_hparams(logger, cfg, result.metrics, trainer.global_step)
    if cfg.run.export:
        result.export_dir = export_trained(cfg, module, datamodule, trainer, result.metrics, run_dir / "export")
    trainer.strategy.barrier("export")
    if trainer.is_global_zero:
        result.summary = write_summary(run_dir, datamodule, trainer, result)
    return result


def write_summary(run_dir: Path, datamodule: EditTripletDataModule, trainer: L.Trainer,
                  result: FinetuneResult) -> dict[str, Any]:
    """``summary.json``: rows read, kept, split sizes, every skip by reason (all ranks), steps, loss."""
    index = datamodule.index
    assert index is not None
    summary = {
        "data": {**index.stats.to_json(), "fingerprint": index.fingerprint,
                 "train_used": int(len(datamodule.train_ids)), "heldout_used_for_val": int(len(datamodule.val_ids))},
        "skipped": skip_summary(run_dir / "skipped"),
        "trained": trained_summary(datamodule.counts),
        "global_step": int(trainer.global_step),
        "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
        "world_size": int(trainer.world_size),
        "metrics": result.metrics,
        "export": str(result.export_dir) if result.export_dir else None,
    }
    atomic_write_json(run_dir / "summary.json", summary)
    return summary
