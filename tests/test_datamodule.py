"""Rank/worker balance, exactly-once epochs, seeding, resume skipping and cache checks."""

from __future__ import annotations

import numpy as np
import pytest

from img_lightning.cache.synthetic import write_synthetic_cache
from img_lightning.config.loading import load_config
from img_lightning.config.train import TrainConfig
from img_lightning.data import (
    CacheMismatchError,
    ExpectedFeatures,
    FeatureCacheDataModule,
    rank_batches,
)
from img_lightning.data import RankPlan as ResumableBatchSampler


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    manifest = write_synthetic_cache(root, 100, guidance_dim=16, ip_tokens=4, ip_dim=8, shard_size=16)
    return root, manifest


def _datamodule(root, key, **data):
    cfg = load_config(TrainConfig, [], [f"data.cache={root}"] + [f"data.{k}={v}" for k, v in data.items()])
    return FeatureCacheDataModule(cfg.data, ExpectedFeatures(key, 16, 4, 8))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_batches_balanced_disjoint_and_cover_the_epoch(world):
    ids = np.arange(103)
    plans = [rank_batches(ids, batch_size=4, rank=r, world_size=world, seed=5, epoch=2, shuffle=True)
             for r in range(world)]
    assert len({len(p) for p in plans}) == 1  # equal batch counts on every rank: no DDP hang
    seen = np.concatenate([b for p in plans for b in p])
    assert len(seen) == len(set(seen.tolist()))  # nothing twice
    assert len(ids) - len(seen) < 4 * world  # only the remainder that cannot fill a global step is left
    again = rank_batches(ids, batch_size=4, rank=0, world_size=world, seed=5, epoch=2, shuffle=True)
    assert all(np.array_equal(a, b) for a, b in zip(plans[0], again, strict=True))  # deterministic
    other_epoch = rank_batches(ids, batch_size=4, rank=0, world_size=world, seed=5, epoch=3, shuffle=True)
    assert not all(np.array_equal(a, b) for a, b in zip(plans[0], other_epoch, strict=True))


def test_evaluation_plan_covers_everything_once():
    ids = np.arange(23)
    plans = [rank_batches(ids, batch_size=4, rank=r, world_size=2, seed=0, epoch=0, shuffle=False) for r in range(2)]
    seen = sorted(np.concatenate([b for p in plans for b in p]).tolist())
    assert seen == list(range(23))


def test_sampler_starts_where_it_is_told():
    ids = np.arange(40)
    sampler = ResumableBatchSampler(ids, batch_size=4, rank=0, world_size=1, seed=0, shuffle=True,
                                    start_fn=lambda: (1, 3))
    full = sampler.batches(1)
    got = list(sampler)
    assert [(r.epoch, r.position) for r in got] == [(1, p) for p in range(3, 10)]
    assert [r.indices for r in got] == [b.tolist() for b in full[3:]]


def test_datamodule_passes_continue_from_the_checkpointed_position(cache):
    root, manifest = cache
    dm = _datamodule(root, manifest.cache_key, batch_size=10)
    dm.setup("fit")
    assert dm._next_pass() == (0, 0)
    dm.load_state_dict({"epoch": 3, "batches_done": 4})
    assert dm._next_pass() == (3, 4)  # mid-epoch: skip what was trained on
    assert dm._next_pass() == (4, 0)  # the following pass is the next epoch
    dm.load_state_dict({"epoch": 3, "batches_done": 10})
    assert dm._next_pass() == (4, 0)  # saved on the epoch's last batch: start the next one


@pytest.mark.parametrize("workers", [0, 2])
def test_each_sample_exactly_once_per_epoch_across_ranks_and_workers(cache, workers):
    root, manifest = cache
    seen = []
    for rank in range(2):
        dm = _datamodule(root, manifest.cache_key, batch_size=5, num_workers=workers)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.batch_sampler.rank, loader.batch_sampler.world_size = rank, 2
        batches = list(loader)
        assert len(batches) == len(loader) == 10
        for b in batches:
            n = b["index"].numel()
            assert b["guidance"].shape[0] == n == 5
            assert b["guidance_mask"].sum(1).tolist() == [int(dm.train_view.num_tokens[i]) for i in b["index"]]
        seen.extend(i for b in batches for i in b["index"].tolist())
    assert sorted(seen) == list(range(100))


def test_validation_fraction_is_held_out(cache):
    root, manifest = cache
    dm = _datamodule(root, manifest.cache_key, val_fraction=0.2)
    dm.setup("fit")
    assert len(dm.val_ids) == 20 and len(dm.train_ids) == 80
    assert not set(dm.val_ids.tolist()) & set(dm.train_ids.tolist())


def test_cache_key_mismatch_is_refused(cache):
    root, _ = cache
    dm = _datamodule(root, "0123456789abcdef")
    with pytest.raises(CacheMismatchError, match="does not match"):
        dm.setup("fit")


def test_feature_shape_mismatch_is_refused(cache):
    root, manifest = cache
    cfg = load_config(TrainConfig, [], [f"data.cache={root}"])
    dm = FeatureCacheDataModule(cfg.data, ExpectedFeatures(manifest.cache_key, 5120, 4, 8))
    with pytest.raises(CacheMismatchError, match="model.guidance_dim=16"):
        dm.setup("fit")


def test_too_many_bad_shards_stop_the_run(tmp_path):
    manifest = write_synthetic_cache(tmp_path, 40, guidance_dim=16, ip_tokens=4, ip_dim=8, shard_size=10)
    (tmp_path / "shard-000002.tar").write_bytes(b"")
    dm = _datamodule(tmp_path, manifest.cache_key, max_bad_fraction=0.3)
    dm.setup("fit")  # 25% bad: tolerated, counted
    assert dm.train_view.num_samples == 30 and len(dm.train_view.skipped) == 1
    dm = _datamodule(tmp_path, manifest.cache_key, max_bad_fraction=0.1)
    with pytest.raises(CacheMismatchError, match="max_bad_fraction"):
        dm.setup("fit")


def test_fp8_cache_batches_cross_as_8_bit_and_are_widened_after_the_transfer(tmp_path):
    """The loader hands over float8 guidance + scales + outlier channels (half the bytes to pin and
    copy); the DataModule's after-transfer hook, or the module itself, widens them."""
    import torch

    from img_lightning.cache.format import FP8_DTYPE, OUTLIER_KEY, QUANT_KEYS, SCALE_KEY
    from img_lightning.cache.quant import dequantize_guidance
    from img_lightning.module import AlignerModule

    fp16 = write_synthetic_cache(tmp_path / "a", 24, guidance_dim=16, ip_tokens=4, ip_dim=8, shard_size=8)
    fp8 = write_synthetic_cache(tmp_path / "b", 24, guidance_dim=16, ip_tokens=4, ip_dim=8, shard_size=8,
                                guidance_dtype="float8_e4m3fn", outlier_channels=2)
    assert fp8.cache_key != fp16.cache_key  # the recipe records the storage dtype
    dm = _datamodule(tmp_path / "b", fp8.cache_key, batch_size=6, num_workers=2)
    dm.setup("fit")
    dm16 = _datamodule(tmp_path / "a", fp16.cache_key, batch_size=6, num_workers=0)
    dm16.setup("fit")
    for batch, ref in zip(dm.train_dataloader(), dm16.train_dataloader(), strict=True):
        assert batch["guidance"].dtype == FP8_DTYPE and batch[SCALE_KEY].dtype == torch.float32
        assert batch[OUTLIER_KEY].shape == (6, batch["guidance"].shape[1], 2)
        assert torch.equal(batch["index"], ref["index"])
        widened = dm.on_after_batch_transfer(batch, 0)
        assert not set(QUANT_KEYS) & set(widened) and widened["guidance"].dtype == torch.float32
        assert torch.equal(widened["guidance"], dequantize_guidance(batch))
        err = (widened["guidance"] - ref["guidance"].float()).abs()
        assert bool((err <= ref["guidance"].float().abs() * 2**-4 + 2e-3).all())  # fp8 vs fp16 rounding
    cfg = load_config(TrainConfig, [], ["model.guidance_dim=16", "model.dim=8", "model.num_tokens=4", "model.depth=1",
                                        "model.heads=2", "model.dim_head=4"], require_complete=False)
    module = AlignerModule(cfg.model, cfg.objective, cfg.reference, cfg.optim)
    guidance, mask, lose, win = module._unpack(batch)  # a raw 8-bit batch straight into the module
    assert torch.equal(guidance, widened["guidance"]) and guidance.dtype == torch.float32
