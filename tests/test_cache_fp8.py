"""8-bit guidance: quantisation bounds and edge cases, the fp8 cache round trip (our reader and plain
WebDataset + safetensors), old-cache loading, verify on bad scales, and the non-finite checks the
reader runs on every sample."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
import webdataset as wds
from safetensors.torch import load as st_load

from img_lightning.cache import BatchReader, CacheView, CacheWriter, Manifest
from img_lightning.cache.finite import has_nonfinite
from img_lightning.cache.format import FP8_DTYPE, OUTLIER_INDEX_KEY, OUTLIER_KEY, SCALE_KEY
from img_lightning.cache.manifest import finalize_manifest
from img_lightning.cache.quant import (
    FP8_MAX,
    NonFiniteFeatures,
    dequantize_batch,
    dequantize_fp8,
    dequantize_guidance,
    quantize_fp8,
    quantize_guidance,
    to_storage,
)
from img_lightning.cache.writer import ShardWriter
from preprocessing.verify import verify_cache

OLD_CACHE = Path(__file__).parent / "data" / "cache_v1"
TINY_NORMAL = torch.finfo(torch.float32).tiny


def _within_fp8_bound(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> bool:
    """E4M3 rounding: <= 2^-4 relative in the normal range, <= scale * 2^-10 absolute below it."""
    err = (dequantize_fp8(q, scale).double() - x.double()).abs()
    bound = x.double().abs() * 2**-4 + scale.double()[:, None] * 2**-10
    return bool((err <= bound * (1 + 1e-6)).all())


def _stored_within_bound(x: torch.Tensor, stored: dict) -> bool:
    """The fp8 bound on the 8-bit channels; 16-bit rounding (2^-11 relative) on the outlier ones."""
    err = (dequantize_guidance(stored).double() - x.double()).abs()
    bound = x.double().abs() * 2**-4 + stored[SCALE_KEY].double()[:, None] * 2**-10
    if OUTLIER_INDEX_KEY in stored:
        idx = stored[OUTLIER_INDEX_KEY].long()
        bound[:, idx] = x.double().abs()[:, idx] * 2**-11
    return bool((err <= bound * (1 + 1e-6)).all())


def _features(t: int, d: int, seed: int) -> torch.Tensor:
    """Hidden-state-like rows: varied norms, two fixed channels ~300x and ~170x larger than the rest."""
    g = torch.Generator().manual_seed(seed)
    norms = torch.rand(t, 1, generator=g).mul(4).add(0.1)
    x = torch.randn(t, d, generator=g) * norms
    x[:, 3] = 300.0 * norms[:, 0]
    x[:, 9] = -170.0 * norms[:, 0]
    return x


def _meta(key: str, t: int) -> dict:
    return {"pair_id": key, "caption": "c", "winner_uid": "w", "loser_uid": "l", "template_id": 0, "num_tokens": t}


def _write_fp8(root: Path, n: int = 7, shard_size: int = 3, d: int = 64, outliers: int = 4):
    originals = {}
    with CacheWriter(root, "fp8key", {"r": "fp8"}, shard_size=shard_size) as w:
        for i in range(n):
            t = 2 + (3 * i) % 7
            raw = {"guidance": _features(t, d, i), "ip_lose": torch.randn(4, 8), "ip_win": torch.randn(4, 8)}
            key = f"f{i:03d}" + ("-long" * 24 if i == 2 else "")  # one name over 100 bytes (PAX header)
            stored = to_storage(raw, torch.float16, FP8_DTYPE, key, outlier_channels=outliers)
            w.write(key, stored, _meta(key, t))
            originals[i] = (raw, stored)
    return originals


# -------------------------------------------------------------------------- quantisation
def test_quantised_values_stay_within_the_fp8_bound():
    x = _features(40, 64, 0)
    q, scale = quantize_fp8(x)
    assert q.dtype == FP8_DTYPE and scale.dtype == torch.float32 and scale.shape == (40,)
    torch.testing.assert_close(scale, x.abs().amax(1) / FP8_MAX)
    assert _within_fp8_bound(x, q, scale)
    rel = (dequantize_fp8(q, scale) - x).norm() / x.norm()
    assert 0 < rel < 2 ** -4  # lossy, but bounded


def test_all_zero_token_gets_scale_one_and_comes_back_exactly():
    x = torch.randn(3, 8)
    x[1] = 0.0
    q, scale = quantize_fp8(x)
    assert scale[1] == 1.0 and torch.all(q[1].float() == 0)
    assert torch.all(dequantize_fp8(q, scale)[1] == 0)
    assert torch.all(scale > 0) and _within_fp8_bound(x, q, scale)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_refused_naming_the_sample(bad):
    x = torch.randn(4, 8)
    x[2, 5] = bad
    with pytest.raises(NonFiniteFeatures, match=r"sample 'pair-17': guidance.*token 2"):
        to_storage({"guidance": x, "ip_lose": torch.zeros(2, 2), "ip_win": torch.zeros(2, 2)},
                   torch.float16, FP8_DTYPE, "pair-17")


def test_16_bit_overflow_is_refused_naming_the_sample():
    tensors = {"guidance": torch.full((2, 4), 7e4), "ip_lose": torch.zeros(2, 2), "ip_win": torch.zeros(2, 2)}
    with pytest.raises(NonFiniteFeatures, match=r"sample 'p9': guidance has NaN/Inf values in torch.float16"):
        to_storage(tensors, torch.float16, None, "p9")
    # 8-bit guidance with a float32 scale holds it; its 16-bit outlier channels do not in float16 ...
    stored = to_storage(tensors, torch.float16, FP8_DTYPE, "p9", outlier_channels=0)
    torch.testing.assert_close(dequantize_guidance(stored), tensors["guidance"])
    with pytest.raises(NonFiniteFeatures, match=r"sample 'p9': guidance: an outlier channel overflows torch.float16"):
        to_storage(tensors, torch.float16, FP8_DTYPE, "p9", outlier_channels=2)
    # ... but do in bfloat16 (the FLUX recipe's dtype)
    stored = to_storage(tensors, torch.bfloat16, FP8_DTYPE, "p9", outlier_channels=2)
    torch.testing.assert_close(dequantize_guidance(stored), tensors["guidance"], rtol=2**-8, atol=0)


def test_very_large_values_keep_a_finite_scale():
    x = torch.tensor([[3.0e38, -1.0e38, 2.5e37, 1.0], [1e30, -3e29, 7e28, 0.0]])
    q, scale = quantize_fp8(x)
    assert bool(torch.isfinite(scale).all()) and not has_nonfinite(q)
    assert bool(torch.isfinite(dequantize_fp8(q, scale)).all())
    assert _within_fp8_bound(x, q, scale)


def test_subnormal_range_values_never_give_a_zero_or_subnormal_scale():
    x = torch.tensor([[1e-40, -3e-41, 0.0, 2e-42], [1e-45, 0.0, 0.0, 0.0], [1e-37, 5e-38, 0.0, -1e-37],
                      [1e-35, 5e-36, 0.0, -1e-35]])
    q, scale = quantize_fp8(x)
    assert torch.all(scale >= TINY_NORMAL) and bool(torch.isfinite(scale).all())
    assert _within_fp8_bound(x, q, scale)
    assert torch.all(scale[:3] == TINY_NORMAL)  # max|x| below 448 x the smallest normal: clamped
    assert float((dequantize_fp8(q, scale) - x)[:2].abs().max()) < 2e-41
    assert scale[3] == pytest.approx(1e-35 / FP8_MAX, rel=1e-6)  # a normal-range scale


def test_outlier_channels_keep_massive_activations_at_16_bits():
    x = _features(50, 64, 1)  # channels 3 and 9 are ~300x and ~170x the others
    plain = dequantize_fp8(*quantize_fp8(x))
    stored = quantize_guidance(x, outlier_channels=4)
    index = stored[OUTLIER_INDEX_KEY]
    assert index.dtype == torch.int32 and {3, 9} <= set(index.tolist()) and index.tolist() == sorted(index.tolist())
    assert torch.equal(stored[OUTLIER_KEY], x[:, index.long()].half())
    assert torch.all(stored["guidance"][:, index.long()].float() == 0)
    assert _stored_within_bound(x, stored)
    # the massive channel no longer sets the per-token scale, so every channel is rounded finer
    assert stored[SCALE_KEY].median() < (x.abs().amax(1) / FP8_MAX).median() / 10
    # The second massive channel: a 16-bit instead of a 3-bit mantissa (the largest is exact either way).
    kept_err = (dequantize_guidance(stored)[:, 9] - x[:, 9]).norm()
    assert kept_err < (plain[:, 9] - x[:, 9]).norm() / 20


def test_dequantize_batch_leaves_16_bit_batches_and_its_input_alone():
    q, scale = quantize_fp8(torch.randn(2, 4))
    batch = {"guidance": q[None], SCALE_KEY: scale[None], "index": torch.tensor([0])}
    out = dequantize_batch(batch)
    assert out["guidance"].dtype == torch.float32 and SCALE_KEY not in out and SCALE_KEY in batch
    plain = {"guidance": torch.ones(1, 2, 4, dtype=torch.float16)}
    assert dequantize_batch(plain)["guidance"] is plain["guidance"]
    with pytest.raises(ValueError, match="no guidance_scale"):
        dequantize_batch({"guidance": q[None]})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_bit_level_nonfinite_check_matches_isfinite(dtype):
    x = torch.randn(1000).to(dtype)
    assert not has_nonfinite(x)
    for bad in (float("nan"), float("inf"), float("-inf"), -float("nan")):
        y = x.clone()
        y[777] = bad
        assert has_nonfinite(y) and has_nonfinite(y[700:800])
    big = torch.tensor([torch.finfo(dtype).max, -torch.finfo(dtype).max, torch.finfo(dtype).tiny]).to(dtype)
    assert not has_nonfinite(big)


def test_fp8_nan_codes_are_found_and_saturated_values_are_not():
    q = torch.tensor([448.0, -448.0, 0.001, 0.0]).to(FP8_DTYPE)
    assert not has_nonfinite(q)
    for code in (0x7F, 0xFF):  # the only NaN encodings of e4m3fn
        bad = q.clone()
        bad.view(torch.uint8)[2] = code
        assert has_nonfinite(bad)


# -------------------------------------------------------------------------- cache round trip
@pytest.mark.parametrize("outliers", [4, 0])
def test_fp8_cache_round_trip_through_our_reader(tmp_path, outliers):
    originals = _write_fp8(tmp_path, outliers=outliers)
    manifest = Manifest.load(tmp_path)
    assert manifest.version == 2
    assert manifest.tensors["guidance"] == {
        "dtype": "float8_e4m3fn", "dim": 64, "scale": {"dtype": "float32", "per": "token"},
        "outliers": {"channels": outliers, "dtype": "float16" if outliers else None}}
    assert manifest.tensors["ip"] == {"dtype": "float16", "shape": [4, 8]}
    view = CacheView.open(tmp_path)
    assert view.quantized and view.guidance_dtype == FP8_DTYPE and view.ip_dtype == torch.float16
    order = [5, 2, 0, 6]
    batch = BatchReader(view).read(order)
    assert batch["guidance"].dtype == FP8_DTYPE and batch[SCALE_KEY].dtype == torch.float32
    assert (OUTLIER_KEY in batch) == bool(outliers)
    assert int(batch["num_bad"]) == 0 and batch["index"].tolist() == order
    widened = dequantize_batch(batch)["guidance"]
    for row, i in enumerate(order):
        raw, stored = originals[i]
        t = raw["guidance"].shape[0]
        for name, value in stored.items():  # every stored byte lands in the batch unchanged
            got = batch[name][row, :t] if name in ("guidance", SCALE_KEY, OUTLIER_KEY) else batch[name][row]
            assert torch.equal(got.view(torch.uint8), value.view(torch.uint8)), name
        assert _stored_within_bound(raw["guidance"], stored)
        torch.testing.assert_close(widened[row, :t], dequantize_guidance(stored), rtol=0, atol=0)
        assert torch.all(widened[row, t:] == 0) and torch.all(batch[SCALE_KEY][row, t:] == 0)
        assert int(batch["guidance_mask"][row].sum()) == t
        assert torch.equal(batch["ip_win"][row], raw["ip_win"].half())
    assert verify_cache(tmp_path).ok


def test_fp8_shards_stream_with_plain_webdataset_and_safetensors(tmp_path):
    originals = _write_fp8(tmp_path)
    urls = [str(p) for p in sorted(tmp_path.glob("shard-*.tar"))]
    by_key = {stored_key: i for i, stored_key in enumerate(
        [f"f{i:03d}" + ("-long" * 24 if i == 2 else "") for i in range(len(originals))])}
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False):
        tensors = st_load(sample["safetensors"])
        _, stored = originals[by_key[sample["__key__"]]]
        assert tensors["guidance"].dtype == FP8_DTYPE
        assert torch.equal(tensors["guidance"].view(torch.uint8), stored["guidance"].view(torch.uint8))
        assert torch.equal(tensors[SCALE_KEY], stored[SCALE_KEY])
        seen += 1
    assert seen == len(originals)


def test_a_format_version_1_cache_still_loads(tmp_path):
    """tests/data/cache_v1 was written by the version-1 writer (webdataset's TarWriter, one PAX
    header per member); its bytes are checked in and never regenerated."""
    root = tmp_path / "v1"
    shutil.copytree(OLD_CACHE, root)
    manifest = Manifest.load(root)
    assert manifest.version == 1 and manifest.tensors["guidance"]["dtype"] == "float16"
    view = CacheView.open(root, verify_checksums=True)
    assert view.num_samples == 5 and not view.skipped and not view.quantized
    batch = BatchReader(view).read(range(5))
    assert int(batch["num_bad"]) == 0 and SCALE_KEY not in batch
    for i in range(5):  # the tensors the writer was given: seed 100 + i, 2 + i tokens
        g = torch.Generator().manual_seed(100 + i)
        expected = torch.randn(2 + i, 8, generator=g).half()
        assert torch.equal(batch["guidance"][i, : 2 + i], expected)
        assert torch.equal(batch["ip_lose"][i], torch.randn(2, 4, generator=g).half())
    assert verify_cache(root).ok
    assert sum(1 for _ in wds.WebDataset([str(p) for p in view.shard_paths], shardshuffle=False)) == 5


# -------------------------------------------------------------------------- bad values
def _rewrite_last_shard_with(root: Path, key: str, tensors: dict) -> None:
    """Replace the last shard by one holding a single given sample (hashes updated, so only a
    content check can see the problem)."""
    manifest = Manifest.load(root)
    last = manifest.shards[-1].name
    with ShardWriter(root / last, manifest.cache_key) as w:
        w.write(key, tensors, _meta(key, tensors["guidance"].shape[0]))
    finalize_manifest(root, manifest.cache_key, manifest.recipe)


def _bad_sample(**changes) -> dict:
    stored = quantize_guidance(_features(5, 64, 99), outlier_channels=4)
    stored.update(ip_lose=torch.zeros(4, 8).half(), ip_win=torch.zeros(4, 8).half())
    for name, fn in changes.items():
        fn(stored[name])
    return stored


@pytest.mark.parametrize("bad_scale", [0.0, float("nan"), float("inf"), -1.0])
def test_verify_and_reader_catch_a_corrupt_scale(tmp_path, caplog, bad_scale):
    _write_fp8(tmp_path)
    _rewrite_last_shard_with(tmp_path, "badscale", _bad_sample(guidance_scale=lambda s: s.__setitem__(3, bad_scale)))
    report = verify_cache(tmp_path)
    assert not report.ok
    assert any("sample 'badscale'" in p and "guidance_scale" in p and "token(s) (first: 3)" in p
               for p in report.problems)
    view = CacheView.open(tmp_path)
    with caplog.at_level(logging.WARNING):
        batch = BatchReader(view).read(range(view.num_samples))
    assert int(batch["num_bad"]) == 1 and batch["index"].numel() == view.num_samples - 1
    assert "badscale" in caplog.text and "guidance_scale" in caplog.text


@pytest.mark.parametrize("bad_index", [[1, 1, 5, 9], [0, 3, 9, 64], [-1, 0, 3, 9]])
def test_verify_and_reader_catch_a_bad_outlier_index(tmp_path, caplog, bad_index):
    _write_fp8(tmp_path)
    _rewrite_last_shard_with(tmp_path, "badindex", _bad_sample(
        guidance_outlier_index=lambda i: i.copy_(torch.tensor(bad_index, dtype=torch.int32))))
    assert any("sample 'badindex'" in p and "guidance_outlier_index" in p for p in verify_cache(tmp_path).problems)
    view = CacheView.open(tmp_path)
    with caplog.at_level(logging.WARNING):
        batch = BatchReader(view).read(range(view.num_samples))
    assert int(batch["num_bad"]) == 1 and "badindex" in caplog.text


def test_reader_drops_fp8_nan_codes(tmp_path, caplog):
    _write_fp8(tmp_path)
    _rewrite_last_shard_with(tmp_path, "nancode",
                             _bad_sample(guidance=lambda q: q.view(torch.uint8)[1].__setitem__(7, 0x7F)))
    view = CacheView.open(tmp_path)
    with caplog.at_level(logging.WARNING):
        batch = BatchReader(view).read(range(view.num_samples))
    assert int(batch["num_bad"]) == 1 and "nancode" in caplog.text and "non-finite values in guidance" in caplog.text
    assert "nancode: guidance has NaN/Inf values" in " ".join(verify_cache(tmp_path).problems).replace("'", "")


@pytest.mark.parametrize("tensor", ["guidance", "ip_win"])
def test_reader_drops_16_bit_samples_with_nan_or_inf(tmp_path, caplog, tensor):
    with CacheWriter(tmp_path, "k", {}, shard_size=4) as w:
        for i in range(6):
            tensors = {"guidance": torch.randn(3, 8).half(), "ip_lose": torch.randn(2, 4).half(),
                       "ip_win": torch.randn(2, 4).half()}
            if i == 4:
                tensors[tensor].view(-1)[5] = float("inf") if tensor == "guidance" else float("nan")
            w.write(f"s{i}", tensors, _meta(f"s{i}", 3))
    view = CacheView.open(tmp_path)
    with caplog.at_level(logging.WARNING):
        batch = BatchReader(view).read([3, 4, 5])
    assert batch["index"].tolist() == [3, 5] and int(batch["num_bad"]) == 1
    assert "s4" in caplog.text and f"non-finite values in {tensor}" in caplog.text
    assert batch["guidance"].shape[0] == batch["ip_win"].shape[0] == batch["guidance_mask"].shape[0] == 2


def test_an_fp8_sample_is_still_read_with_one_preadv(tmp_path, monkeypatch):
    """Zero-copy: all of a sample's tensors (8-bit guidance, scales, outliers, IP tokens) land in
    their batch rows with a single preadv, with no intermediate buffer."""
    import os

    import img_lightning.cache.reader as reader_module

    _write_fp8(tmp_path)
    view = CacheView.open(tmp_path)
    calls = []
    real = os.preadv

    def counting(fd, buffers, offset):
        calls.append(len(buffers))
        return real(fd, buffers, offset)

    monkeypatch.setattr(reader_module.os, "preadv", counting)
    batch = BatchReader(view).read([0, 1, 2, 3])
    assert int(batch["num_bad"]) == 0
    assert calls == [6, 6, 6, 6]  # per sample: guidance, scale, outlier index, outliers, ip_lose, ip_win
