"""The NaN/Inf check on the device (``data.finite_check: device``, what ``auto`` picks on a GPU),
forced on the CPU: bad samples are masked out of the loss - exactly the loss of the batch without
them - and counted and named as the reader's check counts and names them."""

from __future__ import annotations

import logging

import pytest
import torch

from img_lightning.cache import BatchReader, CacheView
from img_lightning.cache.format import SCALE_KEY
from img_lightning.cache.synthetic import write_synthetic_cache
from img_lightning.config.loading import load_config
from img_lightning.config.train import TrainConfig
from img_lightning.data import ExpectedFeatures, FeatureCacheDataModule
from img_lightning.data.device_check import CHECKED, PendingChecks, check_batch
from img_lightning.module import AlignerModule
from img_lightning.objective import preference_objective
from train_utils import TINY_CACHE_DIMS, TINY_MODEL

DIMS = {k: v for k, v in TINY_CACHE_DIMS.items() if k in ("guidance_dim", "ip_tokens", "ip_dim")}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    fp16 = write_synthetic_cache(root / "fp16", 12, seed=0, **TINY_CACHE_DIMS)
    fp8 = write_synthetic_cache(root / "fp8", 12, seed=0, guidance_dtype="float8_e4m3fn", outlier_channels=2,
                                **TINY_CACHE_DIMS)
    return {"fp16": (root / "fp16", fp16.cache_key), "fp8": (root / "fp8", fp8.cache_key)}


def _read(root, rows):
    return BatchReader(CacheView.open(root)).read(rows, check_finite=False)


def test_check_batch_flags_zeroes_and_names_bad_rows(caches):
    batch = _read(caches["fp16"][0], [0, 1, 2, 3])
    batch["guidance"][1, 0, 2] = float("nan")
    batch["ip_win"][3, 1, 1] = float("-inf")
    pad = (~batch["guidance_mask"]).nonzero()
    out, verdicts = check_batch(batch)
    assert out["sample_ok"].tolist() == [True, False, True, False]
    assert verdicts.shape == (4, len(CHECKED))
    assert all(bool(torch.isfinite(out[k]).all()) for k in ("guidance", "ip_lose", "ip_win"))
    assert bool((out["guidance"][1] == 0).all()) and bool((out["ip_win"][3] == 0).all())
    pending = PendingChecks()
    pending.add(verdicts, out["index"])
    assert pending.settle() == [(1, ["guidance"]), (3, ["ip_win"])]
    assert pending.settle() == []  # read back once
    assert len(pad) > 0  # the padding of shorter rows (zeros) never trips the check


@pytest.mark.parametrize("bad", ["zero_scale", "nan_code", "nan_outlier", "inf_scale"])
def test_check_batch_on_8_bit_guidance(caches, bad):
    batch = _read(caches["fp8"][0], [0, 1, 2])
    real = int(batch["guidance_mask"][1].sum())
    if bad == "zero_scale":
        batch[SCALE_KEY][1, real - 1] = 0.0  # finite but wrong: every value of that token would read 0
    elif bad == "nan_code":
        batch["guidance"][1].view(torch.uint8)[0, 5] = 0x7F
    elif bad == "nan_outlier":
        batch["guidance_outlier"][1, 0, 0] = float("nan")
    else:
        batch[SCALE_KEY][1, 0] = float("inf")
    assert bool((batch[SCALE_KEY][0, int(batch["guidance_mask"][0].sum()):] == 0).all())  # padding scale 0: fine
    out, verdicts = check_batch(batch)
    assert out["sample_ok"].tolist() == [True, False, True]
    assert out["guidance"].dtype == torch.float32 and bool(torch.isfinite(out["guidance"]).all())
    named = [name for name, fine in zip(CHECKED, verdicts[1].tolist(), strict=True) if not fine]
    assert named == ([SCALE_KEY] if bad == "zero_scale" else ["guidance", SCALE_KEY] if bad == "inf_scale"
                     else ["guidance"])


def _module():
    cfg = load_config(TrainConfig, [], [f"{k}={v}" for k, v in TINY_MODEL.items()], require_complete=False)
    module = AlignerModule(cfg.model, cfg.objective, cfg.reference, cfg.optim, seed=3)
    with torch.no_grad():  # a trained-looking aligner (the fresh one is the identity)
        for p in module.aligner.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module


def test_masked_samples_give_exactly_the_loss_of_the_batch_without_them(caches):
    root, _ = caches["fp16"]
    rows, bad_row = [4, 5, 6, 7], 1
    full = _read(root, rows)
    full["guidance"][bad_row, 0, 0] = float("nan")
    masked, _ = check_batch(full)
    without = _read(root, [r for i, r in enumerate(rows) if i != bad_row])  # what the reader's check trains on
    module = _module()

    # The objective: bit for bit the same numbers from the same per-sample outputs.
    guidance, mask, lose, win = module._unpack(masked)
    pred, ref = module.aligner(guidance, lose, mask), module.reference(guidance, lose, mask)
    keep = masked["sample_ok"]
    a = preference_objective(pred, ref, win, lose, keep=keep)
    b = preference_objective(pred[keep], ref[keep], win[keep], lose[keep])
    for key in ("loss", "base", "pref", "dpo_margin", "spin_margin", "implicit_acc", "closer_to_winner", "ref_acc"):
        assert torch.equal(a[key], b[key]), key

    # The training step: the same loss and gradients as the batch the reader would have built without
    # the bad sample (its rows are batched with other lengths, so equal up to float32 rounding).
    def step(batch):
        module.zero_grad()
        loss = module.training_step(batch, 0)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.aligner.named_parameters()}
        return loss.detach(), grads, module.pop_swap_distances()

    loss_m, grads_m, swap_m = step(masked)
    loss_w, grads_w, swap_w = step(without)
    torch.testing.assert_close(loss_m, loss_w, rtol=1e-6, atol=0)
    for name, g in grads_w.items():
        torch.testing.assert_close(grads_m[name], g, rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(swap_m, swap_w, rtol=1e-6, atol=0)  # the masked sample takes no part in swaps
    assert all(bool(torch.isfinite(g).all()) for g in grads_m.values())


def test_datamodule_checks_on_the_device_only_when_asked(caches, monkeypatch):
    root, key = caches["fp16"]

    def datamodule(mode):
        cfg = load_config(TrainConfig, [], [f"data.cache={root}", f"data.finite_check={mode}", "data.batch_size=4",
                                            "data.num_workers=0"])
        dm = FeatureCacheDataModule(cfg.data, ExpectedFeatures(key, **{"guidance_dim": 16, "ip_tokens": 4,
                                                                        "ip_dim": 8}))
        dm.setup("fit")
        return dm

    assert not datamodule("auto").checks_on_device()  # no trainer, no GPU: the reader checks
    assert datamodule("device").checks_on_device() and not datamodule("reader").checks_on_device()
    import img_lightning.cache.reader as reader_module

    calls = []
    monkeypatch.setattr(reader_module, "has_nonfinite", lambda t: calls.append(1) or False)
    next(iter(datamodule("device").train_dataloader()))
    assert calls == []  # the reader thread skipped the check
    next(iter(datamodule("reader").train_dataloader()))
    assert calls


def test_validation_names_bad_samples_found_on_the_device(caches, caplog):
    root, key = caches["fp16"]
    cfg = load_config(TrainConfig, [], [f"data.cache={root}", "data.finite_check=device", "data.batch_size=4"])
    dm = FeatureCacheDataModule(cfg.data, ExpectedFeatures(key, 16, 4, 8))
    dm.setup("fit")
    batch = _read(root, [0, 1, 2])
    batch["ip_lose"][2, 0, 0] = float("nan")
    with caplog.at_level(logging.WARNING):
        out = dm.on_after_batch_transfer(batch, 0)  # no trainer: not training, so named now, not counted
    assert out["sample_ok"].tolist() == [True, True, False]
    assert "s0000-0000002" in caplog.text and "non-finite values in ip_lose" in caplog.text
    assert dm.bad_samples == 0
