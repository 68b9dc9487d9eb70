"""Shared helpers for training tests: tiny configs over synthetic caches, a simulated kill, a
single-task ``srun`` environment with a stand-in ``scontrol``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from img_lightning.config.loading import load_config
from img_lightning.config.train import TrainConfig

# synthetic caches that fit TINY_MODEL: write_synthetic_cache(dir, n, seed=..., **TINY_CACHE_DIMS)
TINY_CACHE_DIMS = dict(guidance_dim=16, ip_tokens=4, ip_dim=8, min_tokens=3, max_tokens=9, shard_size=8)

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


class CrashAt(Callback):
    """A kill right after optimizer step ``step`` (before any checkpoint of that step)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")


def poison_cache(root: Path, bad: set[int]) -> None:
    """Rewrite the shards of a tiny synthetic cache (``TINY_CACHE_DIMS``) that hold the sample ids
    ``bad`` (same sizes, checksums off): those samples, keyed ``poisoned{id}``, hold a NaN in their
    guidance, the others of the shard are fresh finite samples."""
    from img_lightning.cache import Manifest
    from img_lightning.cache.manifest import finalize_manifest
    from img_lightning.cache.writer import ShardWriter

    manifest = Manifest.load(root)
    gen = torch.Generator().manual_seed(0)
    start = 0
    for shard in manifest.shards:
        ids = range(start, start + shard.num_samples)
        start += shard.num_samples
        if not bad.intersection(ids):
            continue
        with ShardWriter(root / shard.name, manifest.cache_key) as w:
            for i in ids:
                g = torch.randn(4, 16, generator=gen).half()
                if i in bad:
                    g[1, 3] = float("nan")
                key = f"poisoned{i}" if i in bad else f"refilled{i}"
                w.write(key, {"guidance": g, "ip_lose": torch.randn(4, 8, generator=gen).half(),
                              "ip_win": torch.randn(4, 8, generator=gen).half()},
                        {"pair_id": key, "caption": "c", "winner_uid": "w", "loser_uid": "l", "template_id": 0,
                         "num_tokens": 4})
    finalize_manifest(root, manifest.cache_key, manifest.recipe)


def srun_environment(monkeypatch, tmp_path: Path, job_name: str, job_id: str) -> Path:
    """This process as the only task of a SLURM job step; ``scontrol`` is a stand-in that appends its
    arguments to the returned log file."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    log = tmp_path / "scontrol.log"
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n')
    (fake_bin / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    for name, value in {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": job_name,
                        "SLURM_JOB_ID": job_id, "SLURM_NODELIST": "node001", "SLURM_PROCID": "0",
                        "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(name, value)
    return log
