"""``data.max_bad_fraction`` for the aligner means what the config says: the share of unusable
samples among those the run reads, summed over all ranks and judged the same on every rank, each
pass over the data counted again (a bad sample read in three epochs is three of three epochs' reads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from img_lightning.cache.synthetic import write_synthetic_cache
from img_lightning.data.plan import rank_batches
from img_lightning.training import run_training
from train_utils import TINY_CACHE_DIMS, CrashAt, poison_cache, tiny_config, tiny_overrides


def _state(run_dir: Path) -> dict:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["FeatureCacheDataModule"]


def test_two_ranks_sum_their_bad_samples_before_judging(tmp_path):
    """40 samples, 4 of them NaN (10 %), limit 7.5 %: each rank reads 2 of them in its epoch, 5 % of
    the cache. Counted per rank against the whole cache (the old rule) the run passed; over both
    ranks it is refused on both ranks together (no hang), with exit status 2."""
    root = tmp_path / "cache"
    key = write_synthetic_cache(root, 40, seed=0, **TINY_CACHE_DIMS).cache_key
    ids = np.arange(40)
    per_rank = [np.concatenate(rank_batches(ids, batch_size=4, rank=r, world_size=2, seed=0, epoch=0, shuffle=True))
                for r in (0, 1)]
    bad = {int(per_rank[0][1]), int(per_rank[0][9]), int(per_rank[1][3]), int(per_rank[1][12])}
    poison_cache(root, bad)
    args = tiny_overrides(root, key, tmp_path / "runs", "ddp", **{
        "trainer.devices": 2, "trainer.strategy": "ddp", "trainer.max_steps": 5, "trainer.val_check_interval": 100,
        "data.max_bad_fraction": 0.075, "data.finite_check": "reader"})
    script = Path(sys.executable).parent / "img-train"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([str(script), *args], env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-4000:]
    assert "4 of the 32 training samples read so far" in out and "max_bad_fraction=0.075" in out, out[-4000:]
    assert out.count("img-train: error:") == 2, out[-4000:]  # both ranks stopped, at the same step


@pytest.mark.parametrize("finite_check", ["reader", "device"])
def test_a_bad_share_within_the_limit_trains_for_many_epochs(tmp_path, finite_check):
    """1 NaN sample in 40 (2.5 %) under a 5 % limit: read once per epoch, so three epochs read it 3
    times in 120 reads. The old rule counted 3 bad samples against the cache's 40 and stopped."""
    root = tmp_path / "cache"
    key = write_synthetic_cache(root, 40, seed=0, **TINY_CACHE_DIMS).cache_key
    poison_cache(root, {17})
    cfg = tiny_config(root, key, tmp_path, "epochs", **{"trainer.max_steps": 30, "trainer.val_check_interval": 100,
                                                          "data.max_bad_fraction": 0.05,
                                                          "data.finite_check": finite_check})
    run_training(cfg)
    state = _state(tmp_path / "epochs")
    assert (state["epoch"], state["bad_samples"], state["samples_read"]) == (2, 3, 120)


@pytest.mark.parametrize("finite_check", ["reader", "device"])
def test_a_resumed_run_continues_the_counts(tmp_path, finite_check):
    root = tmp_path / "cache"
    key = write_synthetic_cache(root, 40, seed=0, **TINY_CACHE_DIMS).cache_key
    poison_cache(root, {3, 17, 30})
    extra = {"trainer.max_steps": 15, "trainer.checkpoint_every_n_steps": 3, "trainer.val_check_interval": 100,
             "data.max_bad_fraction": 0.1, "data.finite_check": finite_check}
    run_training(tiny_config(root, key, tmp_path, "straight", **extra))
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run_training(tiny_config(root, key, tmp_path, "killed", **extra), [CrashAt(11)])
    run_training(tiny_config(root, key, tmp_path, "killed", **{**extra, "run.ckpt_path": "last"}))
    straight, resumed = _state(tmp_path / "straight"), _state(tmp_path / "killed")
    assert straight == resumed
    assert straight["samples_read"] == 15 * 4 and straight["bad_samples"] >= 3  # epoch 0 read all three
