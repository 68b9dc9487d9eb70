"""The MLLM finetuning stage (``img-finetune-mllm train``), plugged into the one job assembly
(:mod:`img_lightning.job`).

The same run-directory contract as ``img-train`` (the same assembly makes it):
``{run.root}/{run.name}`` without a timestamp (the same on every rank and across SLURM requeues)
holding ``config.yaml`` + ``run_info.json`` (git SHA, versions, command), ``samples.parquet``
(every triplet's key, location, split and question index), ``tensorboard/``,
``checkpoints/last.ckpt`` (a directory with FSDP's sharded checkpoints), ``skipped/rank*.jsonl``,
``summary.json`` and, at the end, ``export/``. A resume (``run.ckpt_path=last``) must be the same
run: the config is compared with the saved one, and the data fingerprint, world size and batch
size with the checkpoint's.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import Strategy

from ..atomic import atomic_write_json
from ..config.finetune_mllm import FinetuneMLLMConfig, resume_free_keys
from ..config.loading import ConfigError, to_container
from ..job import Job, JobResult, Stage, run_job, standard_callbacks
from ..run_dir import git_revision
from .accounting import StepAccounting, trained_summary  # (with .provenance: what a checkpoint records)
from .datamodule import EditTripletDataModule, skip_summary
from .module import MLLMFinetuneModule
from .provenance import RunRecord
from .strategy import build_strategy
from .throughput import TokenThroughput

log = logging.getLogger(__name__)

# Lightning's resume and pytree warnings are silenced by ..job (imported above), as for img-train.
# The frozen vision tower is deliberately kept in eval mode (see model.py).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


@dataclass
class FinetuneResult(JobResult):
    export_dir: Optional[Path] = None
    summary: dict[str, Any] = field(default_factory=dict)


def _value(x: Any) -> str:
    return str(getattr(x, "value", x))


def accumulation(cfg: FinetuneMLLMConfig, world_size: int) -> int:
    """Gradient accumulation: from ``data.global_batch_size`` when set (must divide exactly)."""
    global_batch = cfg.data.global_batch_size
    if global_batch is None:
        return int(cfg.trainer.accumulate_grad_batches)
    per_step = int(cfg.data.batch_size) * world_size
    if global_batch % per_step:
        raise ConfigError(f"data.global_batch_size={global_batch} is not a multiple of data.batch_size x ranks = "
                          f"{cfg.data.batch_size} x {world_size}; change data.batch_size or the number of GPUs")
    return global_batch // per_step


def build_callbacks(cfg: FinetuneMLLMConfig, run_dir: Path) -> list[Callback]:
    return [
        StepAccounting(),  # global read/skipped/trained counts, the bad-fraction rule, empty steps
        RunRecord(cfg),  # the config and base-model identity in every checkpoint
        TokenThroughput(),
        *standard_callbacks(cfg, run_dir),
    ]


def config_sha256(folder: Path) -> Optional[str]:
    path = Path(folder) / "config.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def export_manifest(cfg: FinetuneMLLMConfig, datamodule: EditTripletDataModule, global_step: int, world_size: int,
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
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "lightning": lightning.__version__}
    try:
        import peft

        versions["peft"] = peft.__version__
    except ImportError:
        pass
    return {
        "base": {"backend": str(cfg.mllm.backend), "model": str(cfg.mllm.model), "revision": cfg.mllm.revision,
                 "path": str(folder), "config_sha256": config_sha256(folder)},
        "data": {"dataset": cfg.data.dataset, "fingerprint": index.fingerprint, "rows_read": index.stats.rows_read,
                 "train_samples": datamodule.num_train, "heldout_samples": index.stats.heldout,
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


def export_trained(cfg: FinetuneMLLMConfig, module: MLLMFinetuneModule, datamodule: EditTripletDataModule,
                   trainer: L.Trainer, metrics: dict[str, float], out_dir: Path,
                   callbacks: Sequence[Callback] = ()) -> Optional[Path]:
    """Write the export (rank 0; under FSDP every rank helps gather the weights). ``callbacks``: the
    run's, whose :class:`RunRecord` knows the base model's weights."""
    from transformers import AutoProcessor

    from ..encoders.mllm import mllm_folder
    from .export import export_model, full_state_dict_fsdp, plain_model

    if module.sharded:  # every rank takes part in gathering the shards; rank 0 gets the full weights
        root = trainer.strategy.model
        assert root is not None, "export_trained runs after fit"
        state = full_state_dict_fsdp(root)
        model = plain_model(module.core.config, module.backend, state) if state is not None else None
    else:
        model = module.model if trainer.is_global_zero else None  # a LoRA model is merged by export_model
    if not trainer.is_global_zero:
        return None
    processor = AutoProcessor.from_pretrained(mllm_folder(cfg.mllm, key="mllm"))
    manifest = export_manifest(cfg, datamodule, trainer.global_step, trainer.world_size,
                               trainer.accumulate_grad_batches, metrics)
    base = next((c.base for c in callbacks if isinstance(c, RunRecord) and c.base), None)
    if base is not None:
        manifest["base"]["weights_sha256"] = base["sha256"]
    path = export_model(model, processor, out_dir, manifest, dtype=str(cfg.run.export_dtype),
                        check_batch=datamodule.check_batch())
    log.info("exported the finetuned MLLM to %s", path)
    return path


FinetuneJob = Job[FinetuneMLLMConfig, EditTripletDataModule, MLLMFinetuneModule]


class FinetuneStage(Stage[FinetuneMLLMConfig, EditTripletDataModule, MLLMFinetuneModule, FinetuneResult]):
    """``img-finetune-mllm train``: the edit-triplet DataModule, the MLLM module under FSDP/DDP,
    accumulation from ``data.global_batch_size``, a refusal of a run that trained on nothing, the
    held-out loss, the export (every rank helps gather sharded weights) and ``summary.json``."""

    command = "img-finetune-mllm train"
    schema = FinetuneMLLMConfig
    result_type = FinetuneResult

    def resume_free_keys(self, cfg: FinetuneMLLMConfig) -> frozenset[str]:
        return resume_free_keys(cfg)

    def datamodule(self, cfg: FinetuneMLLMConfig, run_dir: Path) -> EditTripletDataModule:
        return EditTripletDataModule(cfg.data, cfg.mllm, skip_dir=run_dir / "skipped",
                                     progress=bool(cfg.trainer.enable_progress_bar),
                                     record_path=run_dir / "samples.parquet")

    def module(self, cfg: FinetuneMLLMConfig) -> MLLMFinetuneModule:
        return MLLMFinetuneModule(cfg.mllm, cfg.finetune, cfg.optim, strategy=_value(cfg.trainer.strategy),
                                  seed=cfg.run.seed)

    def callbacks(self, cfg: FinetuneMLLMConfig, run_dir: Path) -> list[Callback]:
        return build_callbacks(cfg, run_dir)

    def strategy(self, cfg: FinetuneMLLMConfig) -> str | Strategy:
        return build_strategy(cfg)

    def accumulation(self, cfg: FinetuneMLLMConfig, world_size: int) -> int:
        return accumulation(cfg, world_size)

    def run_info(self, trainer: L.Trainer) -> dict[str, Any]:
        return {"accumulate_grad_batches": trainer.accumulate_grad_batches}

    def after_fit(self, job: FinetuneJob) -> None:
        job.datamodule.check_trained()  # no trained sample: an error, never an export of the base model

    def validates(self, job: FinetuneJob) -> bool:
        val_ids = job.datamodule.val_ids
        return val_ids is not None and len(val_ids) > 0 and job.cfg.trainer.limit_val_batches > 0

    def finish(self, job: FinetuneJob, result: FinetuneResult) -> None:
        if job.cfg.run.export:
            result.export_dir = export_trained(job.cfg, job.module, job.datamodule, job.trainer, result.metrics,
                                               job.run_dir / "export", job.callbacks)
        job.trainer.strategy.barrier("export")
        if job.trainer.is_global_zero:
            result.summary = write_summary(job.run_dir, job.datamodule, job.trainer, result)


def run_finetune(cfg: FinetuneMLLMConfig, extra_callbacks: Sequence[Callback] = ()) -> FinetuneResult:
    """Fit, measure the held-out loss, export. Returns the final metrics (rank 0 has them all)."""
    return run_job(cfg, FinetuneStage(), extra_callbacks)


def write_summary(run_dir: Path, datamodule: EditTripletDataModule, trainer: L.Trainer,
                  result: FinetuneResult) -> dict[str, Any]:
    """``summary.json``: rows read, kept, split sizes, every skip by reason (all ranks), steps, loss."""
    index = datamodule.index
    assert index is not None
    summary = {
        "data": {**index.stats.to_json(), "fingerprint": index.fingerprint,
                 "train_used": datamodule.num_train, "heldout_used_for_val": datamodule.num_val},
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
