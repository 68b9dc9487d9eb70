"""The aligner's training stage (``img-train``), plugged into the one job assembly (:mod:`.job`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from .aligner import ImplicitAligner
from .callbacks import ReferenceSwap, Throughput
from .config.loading import ConfigError, load_config, to_container
from .config.train import RESUME_FREE_KEYS, DataConfig, TrainConfig, TrainerConfig
from .data import ExpectedFeatures, FeatureCacheDataModule
from .data.step_counts import SettleAtStep
from .job import Job, JobResult, Stage, parse_devices, run_job, standard_callbacks
from .module import AlignerModule, aligner_weights_from_checkpoint


@dataclass
class TrainResult(JobResult):
    exports: dict[str, str] = field(default_factory=dict)
    best_checkpoint: Optional[str] = None


def expected_cache_key(data_cfg: DataConfig) -> str:
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


def resume_free_keys(cfg: TrainConfig) -> frozenset[str]:
    """Keys that may change on resume; ``max_steps`` shapes the lr curve of a cosine schedule."""
    if cfg.optim.schedule == "cosine":
        return RESUME_FREE_KEYS - {"trainer.max_steps", "trainer.max_epochs"}
    return RESUME_FREE_KEYS


def planned_world_size(trainer_cfg: TrainerConfig) -> Optional[int]:
    """Processes the run will have, when the config says (``devices: auto`` leaves it to Lightning)."""
    devices = parse_devices(trainer_cfg.devices)
    if isinstance(devices, str) or (isinstance(devices, int) and devices < 0):  # "auto" is the only str
        return None
    return (len(devices) if isinstance(devices, list) else devices) * int(trainer_cfg.num_nodes)


def build_module(cfg: TrainConfig) -> AlignerModule:
    return AlignerModule(cfg.model, cfg.objective, cfg.reference, cfg.optim, seed=cfg.run.seed)


def build_datamodule(cfg: TrainConfig) -> FeatureCacheDataModule:
    expected = ExpectedFeatures(
        cache_key=expected_cache_key(cfg.data),
        guidance_dim=cfg.model.guidance_dim,
        ip_tokens=cfg.model.num_tokens,
        ip_dim=cfg.model.dim,
    )
    return FeatureCacheDataModule(cfg.data, expected)


def build_callbacks(cfg: TrainConfig, run_dir: Path) -> list[Callback]:
    return [
        SettleAtStep(),  # read/bad samples summed over ranks at each step, the data.max_bad_fraction rule
        ReferenceSwap(patience=cfg.reference.patience, log_dir=run_dir / "reference_swaps"),
        Throughput(),
        *standard_callbacks(cfg, run_dir),
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


AlignerJob = Job[TrainConfig, FeatureCacheDataModule, AlignerModule]


class AlignerStage(Stage[TrainConfig, FeatureCacheDataModule, AlignerModule, TrainResult]):
    """``img-train``: the feature-cache DataModule (caches checked before anything starts), the
    AlignerModule with its reference swap, validation when there is held-out data, and the export of
    the final and the best aligner."""

    command = "img-train"
    schema = TrainConfig
    result_type = TrainResult

    def resume_free_keys(self, cfg: TrainConfig) -> frozenset[str]:
        return resume_free_keys(cfg)

    def datamodule(self, cfg: TrainConfig, run_dir: Path) -> FeatureCacheDataModule:
        datamodule = build_datamodule(cfg)
        datamodule.open_caches()  # before models, DDP processes or the run directory exist
        world = planned_world_size(cfg.trainer)
        if world is not None:
            datamodule.check_fits(world)
        return datamodule

    def module(self, cfg: TrainConfig) -> AlignerModule:
        return build_module(cfg)

    def callbacks(self, cfg: TrainConfig, run_dir: Path) -> list[Callback]:
        return build_callbacks(cfg, run_dir)

    def validates(self, job: AlignerJob) -> bool:
        return job.datamodule.val_ids is not None

    def finish(self, job: AlignerJob, result: TrainResult) -> None:
        cfg, trainer, module = job.cfg, job.trainer, job.module
        best = next((c.best_model_path for c in job.callbacks
                     if isinstance(c, ModelCheckpoint) and c.monitor and c.best_model_path), None)
        result.best_checkpoint = best or None
        if not (cfg.run.export and trainer.is_global_zero):
            return
        view = job.datamodule.train_view
        assert view is not None  # opened before the run started
        info = {"cache_key": view.manifest.cache_key, "passes": cfg.model.passes,
                "global_step": trainer.global_step, "config": to_container(cfg)}
        result.exports = export_aligner(module.aligner, job.run_dir / "export", "aligner", info)
        if best:
            best_aligner = ImplicitAligner(**module.aligner.dims)
            best_aligner.load_state_dict(aligner_weights_from_checkpoint(best))
            result.exports.update(export_aligner(best_aligner, job.run_dir / "export", "aligner_best", info))


def run_training(cfg: TrainConfig, extra_callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Fit, validate, export. Returns the final validation metrics (rank 0 has them all)."""
    return run_job(cfg, AlignerStage(), extra_callbacks)
