"""`img-preprocess` end to end on the demo parquet and the tiny encoders: content, determinism,
crash safety and resume, array tasks, verify."""

import json
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from img_lightning.cache import BatchReader, CacheView, Manifest
from img_lightning.cache.format import decode_tensors
from img_lightning.config.loading import load_config
from img_lightning.config.preprocess import PreprocessConfig
from img_lightning.encoders.templates import template_id_for
from img_lightning.recipe import cache_key_of
from preprocessing.cli import main
from preprocessing.demo_data import write_demo_parquet
from preprocessing.extract import FeatureExtractor
from preprocessing.pickapic import ImageFetcher, decode_image, scan_pairs
from preprocessing.run import run_preprocess, validate_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "preprocess" / "demo.yaml"
NUM_PAIRS = 30
SHARD_SIZE = 8


@pytest.fixture(scope="module")
def demo_parquet(tmp_path_factory):
    path = tmp_path_factory.mktemp("pickapic") / "demo.parquet"
    summary = write_demo_parquet(path, NUM_PAIRS, seed=1)
    assert summary["rows"] == NUM_PAIRS + 2
    return path


@pytest.fixture(scope="module")
def overrides(tiny_llava_dir, tiny_ip_adapter_dir, demo_parquet):
    return [f"data.input={demo_parquet}", f"encoders.mllm.path={tiny_llava_dir}",
            f"encoders.ip.image_encoder_path={tiny_ip_adapter_dir}", f"encoders.ip.adapter_path={tiny_ip_adapter_dir}",
            f"cache.shard_size={SHARD_SIZE}", "encoders.mllm.batch_size=4", "encoders.ip.batch_size=8"]


def _cfg(overrides, out, *extra):
    return load_config(PreprocessConfig, [DEMO], [*overrides, f"data.output={out}", *extra])


@pytest.fixture(scope="module")
def extractor(overrides, tmp_path_factory):
    return FeatureExtractor.from_config(_cfg(overrides, tmp_path_factory.mktemp("x")).encoders)


@pytest.fixture(scope="module")
def cache_a(overrides, extractor, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "a"
    result = run_preprocess(_cfg(overrides, out), progress=False, extractor=extractor)
    assert result.manifest is not None
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cache_content_counts_and_features(cache_a, overrides, extractor, demo_parquet):
    m = Manifest.load(cache_a)
    assert m.num_samples == NUM_PAIRS and len(m.shards) == 4  # 31 planned pairs (corrupt one included) / 8
    assert m.cache_key == cache_key_of(_cfg(overrides, cache_a))
    assert m.tensors == {"guidance": {"dtype": "float16", "dim": 64}, "ip": {"dtype": "float16", "shape": [16, 64]}}
    summary = json.loads((cache_a / "summary.json").read_text())
    assert (summary["rows_read"], summary["kept"], summary["ties_dropped"], summary["duplicates"],
            summary["bad_images"], summary["written"]) == (NUM_PAIRS + 2, NUM_PAIRS + 1, 1, 0, 1, NUM_PAIRS)
    reports = [json.loads(p.read_text()) for p in sorted((cache_a / "reports").glob("*.json"))]
    assert sum(r["planned"] for r in reports) == NUM_PAIRS + 1
    assert sum(len(r["skipped"]) for r in reports) == 1

    view = CacheView.open(cache_a)
    batch = BatchReader(view).read(list(range(view.num_samples)))  # what img-train reads
    assert batch["guidance"].shape[0] == NUM_PAIRS and batch["ip_win"].shape == (NUM_PAIRS, 16, 64)
    assert batch["guidance_mask"].sum(1).tolist() == view.num_tokens.tolist()
    # Every cached sample is exactly what the shared encoders compute at inference time.
    table = scan_pairs(str(demo_parquet))
    row_of = {pid: i for i, pid in enumerate(table.pair_id)}
    fetcher = ImageFetcher(table)
    checked = 0
    for shard in m.shards:
        with tarfile.open(cache_a / shard.name) as tar:
            metas = [json.load(tar.extractfile(x)) for x in tar if x.name.endswith(".json")]
        for meta in metas[:2]:
            i = row_of[meta["pair_id"]]
            assert meta["caption"] == table.caption[i] and meta["winner_uid"] == table.winner_uid[i]
            assert meta["template_id"] == template_id_for(meta["pair_id"], "img-v1")
            win_b, lose_b = fetcher.fetch([i])[0]
            win, lose = decode_image(win_b)[0], decode_image(lose_b)[0]
            guidance = extractor.mllm.encode([lose], [meta["caption"]], [meta["template_id"]])[0]
            ip = extractor.ip.encode([lose, win])
            with tarfile.open(cache_a / shard.name) as tar:
                stored = decode_tensors(bytearray(tar.extractfile(f"{meta['pair_id']}.safetensors").read()))
            assert meta["num_tokens"] == guidance.shape[0] == stored["guidance"].shape[0]
            torch.testing.assert_close(stored["guidance"].float(), guidance, rtol=2e-3, atol=2e-3)
            torch.testing.assert_close(stored["ip_lose"].float(), ip[0], rtol=2e-3, atol=2e-3)
            torch.testing.assert_close(stored["ip_win"].float(), ip[1], rtol=2e-3, atol=2e-3)
            checked += 1
    assert checked == 8


def test_same_input_gives_byte_identical_cache(cache_a, overrides, extractor, tmp_path):
    out = tmp_path / "b"
    run_preprocess(_cfg(overrides, out), progress=False, extractor=extractor)
    a, b = _files(cache_a), _files(out)
    assert a.keys() == b.keys() and any(k.endswith(".tar") for k in a)
    assert [k for k in a if a[k] != b[k]] == []


def test_killed_mid_shard_then_resumed_equals_uninterrupted(cache_a, overrides, tmp_path):
    out = tmp_path / "killed"
    args = ["run", str(DEMO), *overrides, f"data.output={out}", "--no-progress"]
    script = textwrap.dedent(f"""
        import os, sys
        from img_lightning.cache import writer as W
        original, count = W.ShardWriter.write, [0]
        def write(self, *a, **k):
            original(self, *a, **k)
            count[0] += 1
            if count[0] == {SHARD_SIZE + 3}:  # three samples into the second shard
                os._exit(9)                    # a hard kill: no cleanup, no exception handlers
        W.ShardWriter.write = write
        from preprocessing.cli import main
        sys.exit(main({args!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    visible = sorted(p.name for p in out.glob("shard-*.tar"))
    assert visible == ["shard-000000.tar"]  # the finished shard only
    assert [p.name for p in out.glob(".shard-000001.tar.*.tmp")]  # the partial one is hidden
    assert not (out / "manifest.json").exists()
    assert main(["verify", str(out)]) == 1
    assert main(["run", str(DEMO), *overrides, f"data.output={out}", "--no-progress"]) == 0
    assert not list(out.glob(".shard-*.tmp"))
    a, b = _files(cache_a), _files(out)
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []


def test_threaded_pipeline_gives_identical_cache(cache_a, overrides, extractor, tmp_path):
    """Prefetch and writer threads (what GPU runs use) change nothing in the output."""
    out = tmp_path / "threaded"
    cfg = _cfg(overrides, out, "run.overlap=thread", "run.decode_threads=3", "run.prefetch_batches=2")
    run_preprocess(cfg, progress=True, extractor=extractor)
    a, b = _files(cache_a), _files(out)
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []


@pytest.mark.parametrize("overlap", ["inline", "thread"])
@pytest.mark.parametrize("stage", ["encoder", "writer"])
def test_failures_abort_cleanly(overlap, stage, overrides, extractor, tmp_path, monkeypatch):
    """An error in the encoders or the writer stops the run with that error; finished shards stay,
    the shard in progress leaves nothing behind."""
    from img_lightning.cache import writer as W

    calls = [0]
    if stage == "encoder":
        original = extractor.forward

        def forward(batch):
            calls[0] += 1
            if calls[0] == 4:  # shard 0 = 2 batches of 4 pairs; fail in shard 1
                raise RuntimeError("encoder exploded")
            return original(batch)

        monkeypatch.setattr(extractor, "forward", forward)
    else:
        original = W.ShardWriter.write

        def write(self, *a, **k):
            calls[0] += 1
            if calls[0] == SHARD_SIZE + 2:
                raise RuntimeError("disk exploded")
            return original(self, *a, **k)

        monkeypatch.setattr(W.ShardWriter, "write", write)
    out = tmp_path / "fail"
    with pytest.raises(RuntimeError, match="exploded"):
        run_preprocess(_cfg(overrides, out, f"run.overlap={overlap}"), progress=False, extractor=extractor)
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar"]
    assert not list(out.glob(".shard-*")) and not (out / "manifest.json").exists()


def test_array_tasks_then_manifest(cache_a, overrides, extractor, tmp_path, capsys):
    out = tmp_path / "array"
    r1 = run_preprocess(_cfg(overrides, out), task_index=1, num_tasks=2, progress=False, extractor=extractor)
    assert r1.manifest is None and sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000001.tar",
                                                                                          "shard-000003.tar"]
    assert main(["manifest", str(out)]) == 2  # shards 0 and 2 are missing: a clear error, no manifest
    assert "not finished" in capsys.readouterr().err and not (out / "manifest.json").exists()
    r0 = run_preprocess(_cfg(overrides, out), task_index=0, num_tasks=2, progress=False, extractor=extractor)
    assert r0.shards_written == 2
    again = run_preprocess(_cfg(overrides, out), task_index=0, num_tasks=2, progress=False, extractor=extractor)
    assert again.shards_written == 0 and again.shards_already_done == 2  # finished shards are skipped
    assert main(["manifest", str(out)]) == 0
    a, b = _files(cache_a), _files(out)
    assert [k for k in a if a.get(k) != b.get(k)] == [] and a.keys() == b.keys()


def test_verify_catches_flipped_byte_and_truncated_shard(cache_a, tmp_path, capsys):
    clean = tmp_path / "clean"
    shutil.copytree(cache_a, clean)
    assert main(["verify", str(clean), "--workers", "1"]) == 0
    assert "OK" in capsys.readouterr().out

    broken = tmp_path / "broken"
    shutil.copytree(cache_a, broken)
    flipped = broken / "shard-000001.tar"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    truncated = broken / "shard-000002.tar"
    truncated.write_bytes(truncated.read_bytes()[:-1500])
    report = tmp_path / "report.json"
    assert main(["verify", str(broken), "--workers", "2", "--json", str(report)]) == 1
    out = capsys.readouterr().out
    assert "shard-000001.tar: sha256" in out and "(corrupt)" in out
    assert "shard-000002.tar: size" in out and "truncated" in out
    assert "shard-000000.tar" not in out and "shard-000003.tar" not in out
    assert json.loads(report.read_text())["ok"] is False


def test_verify_catches_bad_values_with_a_valid_checksum(cache_a, tmp_path, capsys):
    """A shard rewritten with NaNs (and its hashes updated) still fails on its content."""
    from img_lightning.cache.manifest import finalize_manifest
    from img_lightning.cache.writer import ShardWriter

    bad = tmp_path / "nan"
    shutil.copytree(cache_a, bad)
    m = Manifest.load(bad)
    zeros = torch.zeros(5, 64, dtype=torch.float16)
    ip = torch.full((16, 64), float("nan"), dtype=torch.float16)
    with ShardWriter(bad / "shard-000003.tar", m.cache_key) as w:
        w.write("k1", {"guidance": zeros, "ip_lose": ip, "ip_win": ip.clone()},
                {"pair_id": "k1", "caption": "c", "winner_uid": "w", "loser_uid": "l", "template_id": 0,
                 "num_tokens": 5})
    finalize_manifest(bad, m.cache_key, m.recipe)
    assert main(["verify", str(bad), "--workers", "1"]) == 1
    assert "shard-000003.tar: sample 'k1': ip_lose has NaN/Inf values" in capsys.readouterr().out


def test_rerun_with_other_settings_refuses_the_directory(cache_a, overrides, tmp_path, capsys):
    out = tmp_path / "reuse"
    shutil.copytree(cache_a, out)
    assert main([str(DEMO), *overrides, f"data.output={out}", "cache.seed=7", "--no-progress"]) == 2
    assert "already holds a cache planned" in capsys.readouterr().err
    assert main([str(DEMO), *overrides, f"data.output={out}", "encoders.mllm.layer=-2", "--no-progress"]) == 2
    assert "recipe settings" in capsys.readouterr().err


def test_cli_help_config_and_clear_errors(overrides, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "verify" in capsys.readouterr().out
    assert main(["run", str(DEMO), "--print-config"]) == 0
    assert "shard_size: 64" in capsys.readouterr().out
    assert main([str(DEMO), *overrides, f"data.output={tmp_path / 'o'}", "encoders.mllm.path=/nope/llava"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("img-preprocess: error:")]
    assert len(errors) == 1 and "encoders.mllm.path" in errors[0] and "/nope/llava" in errors[0]
    assert main([str(DEMO), *overrides, f"data.output={tmp_path / 'o'}", "cache.dtype=float8"]) == 2
    assert "cache.dtype" in capsys.readouterr().err
    assert main([str(DEMO), *overrides, f"data.output={tmp_path / 'o'}", "cache.shard_sise=3"]) == 2
    assert "shard_sise" in capsys.readouterr().err
    assert main(["verify", str(tmp_path)]) == 1
    assert "not a feature cache" in capsys.readouterr().out


def test_recipes_load_and_have_distinct_keys(overrides, tmp_path):
    files = sorted((REPO / "configs" / "preprocess").glob("*.yaml"))
    names = {f.stem for f in files}
    assert {"sdxl_llava13b", "sdxl_qwen25vl7b", "flux_llava13b", "demo"} <= names
    keys = {}
    # the full recipes take the released question file from the user (its sha256 is in the key)
    questions = tmp_path / "edit_instructions.json"
    questions.write_text(json.dumps(["How should the image change to show {prompt}?"]))
    for f in files:
        cfg = load_config(PreprocessConfig, [f], require_complete=False)
        if OmegaConf.is_missing(cfg.encoders.mllm, "questions"):
            cfg.encoders.mllm.questions = str(questions)
        validate_config(cfg)
        keys[f.stem] = cache_key_of(cfg)
    assert len(set(keys.values())) == len(keys)
    # local paths, batch sizes and devices are not part of the key
    base = load_config(PreprocessConfig, [DEMO], [f"data.output={tmp_path}", "data.input=x"])
    moved = load_config(PreprocessConfig, [DEMO],
                        [*overrides, f"data.output={tmp_path / 'z'}", "encoders.ip.device=cuda"])
    assert cache_key_of(base) == cache_key_of(moved) == keys["demo"]
    paper = load_config(PreprocessConfig, [REPO / "configs/preprocess/sdxl_llava13b.yaml"], require_complete=False)
    assert paper.encoders.mllm.model == "shi-labs/IMG/llava" and paper.encoders.ip.kind == "sdxl_plus"
    assert paper.encoders.mllm.prompt_format == "llava_v0"
    ablation = load_config(PreprocessConfig, [REPO / "configs/preprocess/sdxl_llava13b_original_mllm.yaml"],
                           require_complete=False)
    mllm = ablation.encoders.mllm
    assert mllm.model == "llava-hf/llava-1.5-13b-hf" and mllm.prompt_format == "llava_v1"
    flux = load_config(PreprocessConfig, [REPO / "configs/preprocess/flux_llava13b.yaml"], require_complete=False)
    assert flux.encoders.ip.kind == "flux_xlabs"


def test_demo_images_follow_the_caption(tmp_path):
    """The demo generator: winner draws the caption's scene, the loser differs from it."""
    import numpy as np

    summary = write_demo_parquet(tmp_path / "d.parquet", 12, seed=3)
    table = scan_pairs(summary["path"])
    assert len(table) == 13 and table.stats.ties_dropped == 1
    fetched = ImageFetcher(table).fetch(list(range(len(table))))
    bad = [k for k, (w, lose) in enumerate(fetched) if decode_image(w)[0] is None or decode_image(lose)[0] is None]
    assert len(bad) == 1
    for k, (w, lose) in enumerate(fetched):
        if k in bad:
            continue
        wi, li = np.asarray(decode_image(w)[0], dtype=float), np.asarray(decode_image(lose)[0], dtype=float)
        assert wi.shape == (64, 64, 3) and np.abs(wi - li).mean() > 1.0
        assert table.caption[k].startswith("a ") and table.caption[k].endswith(" background")
    assert sum(summary["changed_attribute_counts"].values()) == 12
    again = write_demo_parquet(tmp_path / "e.parquet", 12, seed=3)
    assert Path(again["path"]).read_bytes() == Path(summary["path"]).read_bytes()


def test_fp8_guidance_cache_from_the_config(cache_a, overrides, extractor, tmp_path, capsys):
    """cache.guidance_dtype=float8_e4m3fn: same pairs, IP tokens identical, guidance within the
    float8 rounding bound of the 16-bit cache, its own cache key, and verify passes."""
    from img_lightning.cache.format import FP8_DTYPE, SCALE_KEY
    from img_lightning.cache.quant import dequantize_batch

    out = tmp_path / "fp8"
    cfg = _cfg(overrides, out, "cache.guidance_dtype=float8_e4m3fn")
    run_preprocess(cfg, progress=False, extractor=extractor)
    m8, m16 = Manifest.load(out), Manifest.load(cache_a)
    assert m8.version == 2 and m8.tensors["guidance"]["dtype"] == "float8_e4m3fn"
    assert m8.tensors["ip"] == m16.tensors["ip"]
    assert m8.cache_key == cache_key_of(cfg) != m16.cache_key
    assert m8.recipe["guidance_dtype"] == "float8_e4m3fn" and "guidance_dtype" not in m16.recipe
    v8, v16 = CacheView.open(out), CacheView.open(cache_a)
    assert v8.keys.tolist() == v16.keys.tolist()
    b8, b16 = BatchReader(v8).read(range(v8.num_samples)), BatchReader(v16).read(range(v16.num_samples))
    assert b8["guidance"].dtype == FP8_DTYPE and SCALE_KEY in b8
    assert torch.equal(b8["ip_win"], b16["ip_win"]) and torch.equal(b8["guidance_mask"], b16["guidance_mask"])
    g8, g16 = dequantize_batch(b8)["guidance"], b16["guidance"].float()
    assert bool(((g8 - g16).abs() <= g16.abs() * (2**-4 + 2**-10) + 1e-3).all())
    assert 0 < float((g8 - g16).norm() / g16.norm()) < 0.05
    assert main(["verify", str(out)]) == 0
    capsys.readouterr()
    # the same config with a storage dtype the schema does not know: one clear error naming the key
    assert main([str(DEMO), *overrides, f"data.output={tmp_path / 'x'}", "cache.guidance_dtype=float8"]) == 2
    assert "cache.guidance_dtype" in capsys.readouterr().err
