"""Shared helpers for training tests: tiny configs over synthetic caches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from img_lightning.config.loading import load_config
from img_lightning.config.train import TrainConfig

TINY_MODEL = {
    "model.guidance_dim": 16,
    "model.dim": 8,
    "model.num_tokens": 4,
    "model.depth": 1,
    "model.heads": 2,
    "model.dim_head": 4,
}


def tiny_overrides(cache: Path, key: str, run_root: Path, name: str, **extra: Any) -> list[str]:
    values = {
        **TINY_MODEL,
        "data.cache": str(cache),
        "data.cache_key": key,
        "data.batch_size": 4,
        "data.num_workers": 0,
        "trainer.accelerator": "cpu",
        "trainer.devices": 1,
        "trainer.precision": "32",
        "trainer.max_steps": 10,
        "trainer.log_every_n_steps": 2,
        "trainer.val_check_interval": 5,
        "trainer.checkpoint_every_n_steps": 3,
        "trainer.enable_progress_bar": False,
        "optim.lr": 3e-3,
        "reference.patience": 2,
        "run.root": str(run_root),
        "run.name": name,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def tiny_config(cache: Path, key: str, run_root: Path, name: str, **extra: Any):
    return load_config(TrainConfig, [], tiny_overrides(cache, key, run_root, name, **extra))
