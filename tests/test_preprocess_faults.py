"""img-preprocess under faults: concurrent writers, leftover temporaries, a full disk, degenerate
data. Nothing already written is lost, nothing silently wrong is kept, no traceback."""

from __future__ import annotations

import errno
import json
import random
from pathlib import Path

import pytest
from PIL import Image

from img_lightning.cache import writer as cache_writer
from img_lightning.cache.lock import ShardLocks
from preprocessing.cli import main
from preprocessing.demo_data import CORRUPT_JPEG, _jpeg, draw_scene, make_row, write_demo_parquet, write_pickapic_rows

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "preprocess" / "demo.yaml"


@pytest.fixture(scope="module")
def demo_parquet(tmp_path_factory):
    path = tmp_path_factory.mktemp("pickapic") / "demo.parquet"
    write_demo_parquet(path, 12, seed=3)
    return path


@pytest.fixture(scope="module")
def models(tiny_llava_dir, tiny_ip_adapter_dir):
    return [f"encoders.mllm.path={tiny_llava_dir}", f"encoders.ip.image_encoder_path={tiny_ip_adapter_dir}",
            f"encoders.ip.adapter_path={tiny_ip_adapter_dir}", "cache.shard_size=4", "encoders.mllm.batch_size=4"]


def _run(models, parquet, out, *extra) -> int:
    return main(["run", str(DEMO), *models, f"data.input={parquet}", f"data.output={out}", "--no-progress", *extra])


def test_a_shard_held_by_another_writer_is_left_to_it(models, demo_parquet, tmp_path, capsys):
    out = tmp_path / "cache"
    live_tmp = out / ".shard-000000.tar.424242.tmp"
    with ShardLocks(out) as other:  # another process is writing shard 0
        assert other.acquire("shard-000000.tar")
        live_tmp.write_bytes(b"half a shard")
        assert _run(models, demo_parquet, out) == 0
        printed = capsys.readouterr()
        assert "left to it" in printed.out and "shard-000000.tar" in printed.out
        assert live_tmp.read_bytes() == b"half a shard"  # its work untouched
        assert not (out / "shard-000000.tar").exists() and (out / "shard-000001.tar").exists()
        assert not (out / "manifest.json").exists()
    # The other writer died (its lock is gone): the next run removes its leftover and finishes.
    assert _run(models, demo_parquet, out) == 0
    assert not live_tmp.exists() and (out / "manifest.json").is_file()
    assert main(["verify", str(out)]) == 0


def test_leftover_temporary_beside_a_finished_shard_is_only_a_note(models, demo_parquet, tmp_path, capsys):
    out = tmp_path / "cache"
    assert _run(models, demo_parquet, out) == 0
    stray = out / ".shard-000001.tar.31337.tmp"
    stray.write_bytes(b"leftover")
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    assert "leftover temporary file" in capsys.readouterr().out
    assert _run(models, demo_parquet, out) == 0  # every shard done: only the cleanup happens
    assert not stray.exists()


def test_full_disk_is_one_message_and_leaves_no_partial_shard(models, demo_parquet, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cache"
    calls = [0]
    original = cache_writer.ShardWriter._add

    def add(self, name, data):
        calls[0] += 1
        if calls[0] == 11:  # into the second shard
            raise OSError(errno.ENOSPC, "No space left on device", str(self.tmp_path))
        return original(self, name, data)

    monkeypatch.setattr(cache_writer.ShardWriter, "_add", add)
    capsys.readouterr()
    assert _run(models, demo_parquet, out) == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and "Traceback" not in err and err.count("error:") == 1
    assert (out / "shard-000000.tar").exists()  # finished work is kept
    assert not list(out.glob(".shard-*.tmp"))  # the partial shard is removed
    monkeypatch.setattr(cache_writer.ShardWriter, "_add", original)
    assert _run(models, demo_parquet, out) == 0 and (out / "manifest.json").is_file()


def _rows(n: int, seed: int, corrupt: bool = False, identical: bool = False):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        scene = {"shape": "circle", "colour": "red", "size": "large", "background": "white"}
        good = _jpeg(draw_scene(scene, 32, rng))
        other = _jpeg(draw_scene({**scene, "colour": "blue"}, 32, rng))
        jpg_1 = good if identical else (CORRUPT_JPEG if corrupt else other)
        rows.append(make_row(i, f"a red circle {i}", good, jpg_1, 1.0, rng))
    return rows


def test_all_rows_unusable_is_an_error_not_an_empty_cache(models, tmp_path, capsys):
    parquet = write_pickapic_rows(tmp_path / "bad.parquet", _rows(5, 0, corrupt=True))
    capsys.readouterr()
    assert _run(models, parquet, tmp_path / "cache") == 2
    err = capsys.readouterr().err
    assert "every pair was skipped" in err and "5 bad images" in err and "Traceback" not in err


def test_identical_images_and_empty_captions_are_dropped_and_counted(models, tmp_path):
    rows = _rows(6, 1) + _rows(2, 2, identical=True)  # the last two: both images the same bytes
    rows[0].update(caption="  ")
    out = tmp_path / "cache"
    assert _run(models, write_pickapic_rows(tmp_path / "mixed.parquet", rows), out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reader"]["empty_captions"] == 1
    assert summary["same_images"] == 2
    assert summary["written"] == 5


def test_captions_too_long_for_the_mllm_are_skipped_and_counted(models, tmp_path, tiny_llava_dir):
    """The tiny LLaVA's context is 512 tokens: a caption of ~600 words cannot fit and is refused
    (not truncated); at evaluation time the same prompt is one clear error."""
    from img_lightning.config.loading import load_config
    from img_lightning.config.preprocess import PreprocessConfig
    from img_lightning.encoders.conversation import PromptTooLong
    from img_lightning.encoders.mllm import GuidanceEncoder

    long_caption = " ".join(["a red circle on a white square"] * 90)
    rows = _rows(4, 5)
    rows[1].update(caption=long_caption)
    out = tmp_path / "cache"
    assert _run(models, write_pickapic_rows(tmp_path / "long.parquet", rows), out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["too_long"] == 1 and summary["written"] == 3

    cfg = load_config(PreprocessConfig, [DEMO], [*models, "data.input=x", "data.output=y"])
    encoder = GuidanceEncoder.from_config(cfg.encoders.mllm)
    short = encoder.prompt_text("a red circle", 0)
    assert encoder.sequence_length(short) < encoder.max_tokens
    with pytest.raises(PromptTooLong, match="more than the model's limit of 512"):
        encoder.encode([Image.new("RGB", (32, 32))], [long_caption], [0])
