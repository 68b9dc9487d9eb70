"""Cache format: writer/reader round trip, one-copy reader vs safetensors, WebDataset compatibility,
byte determinism, and how truncated and corrupt shards are handled."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import webdataset as wds
from safetensors.torch import load as st_load

from img_lightning.cache import BatchReader, CacheView, CacheWriter, Manifest, decode_tensors
from img_lightning.cache.format import decode_meta
from img_lightning.cache.synthetic import write_synthetic_cache


def _sample(i: int, t: int, dtype=torch.float16):
    g = torch.Generator().manual_seed(i)
    tensors = {
        "guidance": torch.randn(t, 12, generator=g).to(dtype),
        "ip_lose": torch.randn(4, 8, generator=g).to(dtype),
        "ip_win": torch.randn(4, 8, generator=g).to(dtype),
    }
    meta = {"pair_id": f"p{i}", "caption": f"cap {i}", "winner_uid": "w", "loser_uid": "l",
            "template_id": i, "num_tokens": t, "winner_index": 1}
    return tensors, meta


def _write(root, n=10, shard_size=4, dtype=torch.float16):
    samples = {}
    with CacheWriter(root, "key0", {"r": 1}, shard_size=shard_size) as w:
        for i in range(n):
            tensors, meta = _sample(i, 3 + (i * 5) % 11, dtype)
            w.write(f"k{i:05d}", tensors, meta)
            samples[i] = tensors
    return samples


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_trip_padding_and_mask(tmp_path, dtype):
    samples = _write(tmp_path, dtype=dtype)
    view = CacheView.open(tmp_path)
    assert view.num_samples == 10 and view.guidance_dtype == view.ip_dtype == dtype and not view.quantized
    batch = BatchReader(view).read([7, 2, 9])
    lengths = [samples[i]["guidance"].shape[0] for i in (7, 2, 9)]
    assert batch["guidance"].shape == (3, max(lengths), 12)
    assert batch["guidance_mask"].sum(1).tolist() == lengths
    for row, i in enumerate((7, 2, 9)):
        t = lengths[row]
        assert torch.equal(batch["guidance"][row, :t], samples[i]["guidance"])
        assert torch.all(batch["guidance"][row, t:] == 0)
        assert torch.equal(batch["ip_lose"][row], samples[i]["ip_lose"])
        assert torch.equal(batch["ip_win"][row], samples[i]["ip_win"])
    assert batch["index"].tolist() == [7, 2, 9] and int(batch["num_bad"]) == 0


def test_shards_are_standard_webdataset_and_decode_with_safetensors(tmp_path):
    samples = _write(tmp_path)
    manifest = Manifest.load(tmp_path)
    urls = [str(tmp_path / s.name) for s in manifest.shards]
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False):
        i = int(sample["__key__"][1:])
        ours = decode_tensors(bytearray(sample["safetensors"]))
        lib = st_load(sample["safetensors"])
        for name in ("guidance", "ip_lose", "ip_win"):
            assert torch.equal(ours[name], lib[name])
            assert torch.equal(lib[name], samples[i][name])
        assert decode_meta(sample["json"])["pair_id"] == f"p{i}"
        seen += 1
    assert seen == 10
    assert manifest.num_samples == 10 and len(manifest.shards) == 3
    assert manifest.tensors == {"guidance": {"dtype": "float16", "dim": 12},
                                "ip": {"dtype": "float16", "shape": [4, 8]}}


def test_same_samples_give_byte_identical_shards(tmp_path):
    _write(tmp_path / "a")
    _write(tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_writer_leaves_no_partial_shard_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with CacheWriter(tmp_path, "k", {}, shard_size=100) as w:
            tensors, meta = _sample(0, 5)
            w.write("a", tensors, meta)
            raise RuntimeError("killed")
    assert list(tmp_path.glob("*.tar")) == [] and list(tmp_path.glob(".*tmp")) == []


def test_writer_rejects_bad_samples(tmp_path):
    tensors, meta = _sample(0, 5)
    with CacheWriter(tmp_path, "k", {}) as w:
        with pytest.raises(ValueError, match="no dots"):
            w.write("a.b", tensors, meta)
        with pytest.raises(ValueError, match="num_tokens"):
            w.write("a", tensors, {**meta, "num_tokens": 4})
        with pytest.raises(ValueError, match="lacks"):
            w.write("a", tensors, {"pair_id": "x"})
        w.write("a", tensors, meta)
        with pytest.raises(ValueError, match="duplicate"):
            w.write("a", tensors, meta)


def test_truncated_shard_is_skipped_and_counted(tmp_path, caplog):
    _write(tmp_path)
    shard = tmp_path / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    with caplog.at_level(logging.WARNING):
        view = CacheView.open(tmp_path)
    assert [s.name for s in view.skipped] == ["shard-000001.tar"]
    assert "truncated" in view.skipped[0].reason and "shard-000001" in caplog.text
    assert view.num_samples == 6 and view.skipped_fraction == pytest.approx(0.4)


def test_checksum_verification_catches_same_size_corruption(tmp_path):
    _write(tmp_path)
    shard = tmp_path / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert CacheView.open(tmp_path).skipped == []  # size unchanged: only sha256 sees it
    view = CacheView.open(tmp_path, verify_checksums=True)
    assert [s.name for s in view.skipped] == ["shard-000000.tar"] and "sha256" in view.skipped[0].reason


def test_corrupt_sample_header_is_dropped_from_its_batch(tmp_path, caplog):
    _write(tmp_path)
    view = CacheView.open(tmp_path)
    # Overwrite the tar header of sample 1 (same file size, so start-up checks pass).
    shard = view.shard_paths[int(view.shard_of[1])]
    data = bytearray(shard.read_bytes())
    start = int(view.offset[1]) - 512
    data[start : start + 100] = b"X" * 100
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        batch = BatchReader(view).read([0, 1, 2])
    assert batch["index"].tolist() == [0, 2] and int(batch["num_bad"]) == 1
    assert batch["guidance"].shape[0] == 2 and "k00001" in caplog.text


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="img-preprocess"):
        CacheView.open(tmp_path)


def test_synthetic_cache_winners_depend_on_guidance(tmp_path):
    manifest = write_synthetic_cache(tmp_path, 24, guidance_dim=16, ip_dim=8, ip_tokens=4, shard_size=10)
    assert manifest.num_samples == 24 and len(manifest.shards) == 3
    view = CacheView.open(tmp_path)
    batch = BatchReader(view).read(list(range(24)))
    delta = (batch["ip_win"].float() - batch["ip_lose"].float()).mean(1)
    assert delta.std(0).mean() > 0.05  # winners are not a constant shift of losers
    index = json.loads((tmp_path / "shard-000000.index.json").read_text())
    assert index["num_samples"] == 10 and len(index["samples"]) == 10
    assert np.all(view.num_tokens >= 8)


def test_index_written_on_the_fly_matches_a_scan_of_the_tar(tmp_path):
    from img_lightning.cache import read_shard_index, scan_shard
    from img_lightning.cache.manifest import sha256_file

    _write(tmp_path, n=9, shard_size=4)
    for shard in sorted(tmp_path.glob("shard-*.tar")):
        entry, records = read_shard_index(shard)
        assert records == scan_shard(shard)
        assert entry.bytes == shard.stat().st_size and entry.sha256 == sha256_file(shard)


def test_buffer_pool_reuses_a_buffer_only_once_every_tensor_of_its_batch_is_gone():
    import gc

    from img_lightning.cache.reader import BufferPool

    pool = BufferPool(max_buffers=2)
    specs = [((4, 8), torch.float16), ((4,), torch.bool), ((3, 5), torch.float32)]
    first = pool.tensors(specs)
    assert [t.shape for t in first] == [(4, 8), (4,), (3, 5)] and first[2].dtype == torch.float32
    address = first[0].data_ptr()
    kept = first[2][1:, 2:]  # a view of one tensor keeps the whole buffer busy
    del first
    gc.collect()
    second = pool.tensors(specs)
    assert second[0].data_ptr() != address and pool.idle == 0
    del kept
    assert pool.idle == 1
    third = pool.tensors(specs)
    assert third[0].data_ptr() == address  # recycled, not allocated afresh
    moved = third[0].clone()  # copies do not hold the buffer
    del second, third
    assert pool.idle == 2 and moved.shape == (4, 8)
    # A pool at its limit with only busy buffers hands out unpooled memory instead of waiting.
    busy = [pool.tensors(specs), pool.tensors(specs)]
    extra = pool.tensors(specs)
    del extra
    assert pool.idle == 0 and len(busy) == 2


def test_the_writer_uses_only_the_standard_tar_format(tmp_path):
    """No PAX header unless a name needs one (the version-1 writer added one per member); offsets
    the index records are where tarfile finds each member's data."""
    import tarfile

    _write(tmp_path, n=4, shard_size=4)
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:2]] == ["k00000.json", "k00000.safetensors"]
    assert all(m.pax_headers == {} and m.mtime == 0 and m.uname == "img" and m.mode == 0o444 for m in members)
    assert shard.stat().st_size % 10240 == 0  # padded to whole tar records


@pytest.mark.parametrize("rename", ["/tmp/elsewhere/{}", "../{}", "sub/{}"], ids=["absolute", "parent", "folder"])
def test_verify_refuses_member_names_the_writer_never_writes(tmp_path, monkeypatch, rename):
    """Issue 19.10: a shard whose members were named with absolute or ../ paths passed verify (the
    manifest and index agreed with it: only the names were foreign)."""
    import img_lightning.cache.writer as writer
    from img_lightning.cache.synthetic import write_synthetic_cache
    from preprocessing.verify import verify_cache

    real = writer.member_name
    monkeypatch.setattr(writer, "member_name", lambda key, ext: rename.format(real(key, ext)))
    write_synthetic_cache(tmp_path / "c", 4, guidance_dim=16, ip_tokens=4, ip_dim=8, min_tokens=3, max_tokens=9)
    monkeypatch.undo()
    report = verify_cache(tmp_path / "c")
    foreign = rename.format("")
    assert not report.ok
    assert any(f"member name '{foreign}" in p and "breaks the writer's rule" in p for p in report.problems), \
        report.problems
