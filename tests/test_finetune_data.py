"""The edit-triplet reader (bad rows, streaming, split) and the rank/epoch plan of the finetuning stage."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from img_lightning.data.plan import PAD
from img_lightning.finetune.plan import epoch_order, eval_batches, train_batches
from img_lightning.finetune.triplets import (
    CorruptImage,
    RowGroupImages,
    TripletDataError,
    decode_image,
    list_parquet_files,
    scan_triplets,
)
from preprocessing.demo_data import CORRUPT_JPEG, IP2P_SCHEMA, write_edit_triplets_parquet, write_ip2p_rows


def _row(i, instruction="make the square red", edited=None, image=b"x"):
    return {"original_prompt": f"a blue square number {i}", "original_image": {"bytes": image, "path": f"{i}.jpg"},
            "edit_prompt": instruction, "edited_prompt": edited if edited is not None else f"a red square number {i}",
            "edited_image": {"bytes": b"y", "path": None}}


def test_bad_rows_are_counted_and_skipped_never_a_crash(tmp_path):
    good = write_edit_triplets_parquet(tmp_path / "a" / "good.parquet", 6, seed=1, bad_rows=False)
    rows = [_row(0, instruction=""), _row(1, instruction=None), _row(2, edited="   "),
            _row(3, instruction="put an <image> here"), _row(4, image=CORRUPT_JPEG), _row(5, image=None)]
    write_ip2p_rows(tmp_path / "a" / "bad.parquet", rows)
    index = scan_triplets(tmp_path / "a")
    s = index.stats
    assert (s.files, s.rows_read, s.empty_instructions, s.empty_prompts, s.placeholder_in_text) == (2, 12, 2, 1, 1)
    assert s.kept == len(index) == 6 + 2  # the two bad images are only found when decoded
    images = RowGroupImages(index.files)
    bad = [i for i in range(len(index)) if index.files[index.file_index[i]].endswith("bad.parquet")]
    for i in bad:
        with pytest.raises(CorruptImage):
            decode_image(images.image_bytes(*index.location(i)))
    assert good["triplets"] == 6


def test_missing_columns_and_no_files_name_what_is_wrong(tmp_path):
    with pytest.raises(TripletDataError, match="no parquet files"):
        list_parquet_files(tmp_path / "nothing-*.parquet")
    pq.write_table(pa.table({"original_prompt": ["a"], "edit_prompt": ["b"]}), tmp_path / "x.parquet")
    with pytest.raises(TripletDataError, match=r"x.parquet: missing column\(s\) \['edited_prompt', 'original_image'\]"):
        scan_triplets(tmp_path / "x.parquet")


def test_files_dirs_globs_and_stable_keys_and_split(tmp_path):
    for k in range(3):
        write_edit_triplets_parquet(tmp_path / "d" / f"part-{k}.parquet", 20, seed=k, bad_rows=False, row_group_size=8)
    # a repeated text triplet (the dataset repeats one with several images): same group, distinct keys
    rows = [_row(0, image=b"a"), _row(0, image=b"b")]
    write_ip2p_rows(tmp_path / "d" / "part-9.parquet", rows)
    by_dir = scan_triplets(tmp_path / "d", heldout_fraction=0.3)
    by_glob = scan_triplets(str(tmp_path / "d" / "part-*.parquet"), heldout_fraction=0.3)
    assert by_dir.keys == by_glob.keys and by_dir.fingerprint == by_glob.fingerprint
    assert len(set(by_dir.keys)) == len(by_dir) == 62
    twins = by_dir.keys[-2:]
    assert twins[0].split("-")[0] == twins[1].split("-")[0] and twins[0] != twins[1]
    assert by_dir.heldout[-1] == by_dir.heldout[-2]  # the same text is never on both sides
    assert 0 < by_dir.stats.heldout < len(by_dir)
    # the split depends on the text only: another salt, another split; the same salt, the same one
    other = scan_triplets(tmp_path / "d", heldout_fraction=0.3, salt="another")
    assert not np.array_equal(other.heldout, by_dir.heldout)
    single = scan_triplets(tmp_path / "d" / "part-1.parquet", heldout_fraction=0.3)
    lookup = dict(zip(by_dir.keys, by_dir.heldout, strict=True))
    assert all(lookup[k] == h for k, h in zip(single.keys, single.heldout, strict=True))
    assert by_dir.group_of.max() + 1 == 3 * 3 + 1  # 3 row groups per file of 20 rows at 8 per group


def test_row_groups_are_read_on_demand_and_bounded(tmp_path):
    write_edit_triplets_parquet(tmp_path / "t.parquet", 40, bad_rows=False, row_group_size=5)
    index = scan_triplets(tmp_path / "t.parquet")
    images = RowGroupImages(index.files, capacity=2)
    first = [i for i in range(len(index)) if index.row_group[i] == 0]
    for i in first:
        decode_image(images.image_bytes(*index.location(i)))
    assert images.row_groups_read == 1  # one read for the whole row group
    for i in range(len(index)):
        images.image_bytes(*index.location(i))
    assert images.row_groups_read == 8 and len(images._cache) == 2  # never more than `capacity` in memory


def test_plan_equal_batches_per_rank_disjoint_and_local():
    group_of = np.repeat(np.arange(10), 7)  # 10 row groups of 7 samples
    ids = np.arange(70)
    per_rank = [train_batches(ids, group_of, batch_size=4, rank=r, world_size=3, seed=5, epoch=2, window=2)
                for r in range(3)]
    assert {len(b) for b in per_rank} == {70 // 12}  # the remainder of a global step is dropped
    flat = [i for b in per_rank for batch in b for i in batch]
    assert len(flat) == len(set(flat)) == 5 * 12
    order = epoch_order(ids, group_of, seed=5, epoch=2, window=2)
    assert sorted(order.tolist()) == ids.tolist()
    windows = [len(set(group_of[order[i : i + 14]].tolist())) for i in range(0, 70, 14)]
    assert windows == [2] * 5  # each window of 14 consecutive samples spans exactly 2 row groups
    assert not np.array_equal(order, epoch_order(ids, group_of, seed=5, epoch=3, window=2))
    assert np.array_equal(order, epoch_order(ids, group_of, seed=5, epoch=2, window=2))


def test_eval_plan_pads_every_rank_to_the_same_batches():
    ids = np.arange(11)
    plans = [eval_batches(ids, batch_size=2, rank=r, world_size=3) for r in range(3)]
    assert [len(p) for p in plans] == [2, 2, 2] and [len(b) for p in plans for b in p] == [2, 2] * 3
    real = sorted(i for p in plans for b in p for i in b if i != PAD)
    assert real == list(range(11)) and sum(i == PAD for p in plans for b in p for i in b) == 1


def test_loader_drops_bad_samples_and_the_run_lists_them(tmp_path, tiny_llava_dir):
    from omegaconf import OmegaConf

    from img_lightning.config.encoders import MLLMConfig
    from img_lightning.config.finetune_mllm import FinetuneDataConfig
    from img_lightning.data.plan import BatchRequest
    from img_lightning.finetune.datamodule import EditTripletDataModule, skip_summary

    rows = [_row(i) for i in range(3)]
    import random

    from preprocessing.demo_data import _jpeg, draw_scene  # noqa: PLC2701 - demo helpers

    rng = random.Random(0)
    scene = {"shape": "square", "colour": "red", "size": "large", "background": "blue"}
    rows[0]["original_image"] = {"bytes": _jpeg(draw_scene(scene, 32, rng)), "path": None}
    rows[2]["original_image"] = {"bytes": _jpeg(draw_scene(scene, 32, rng)), "path": None}
    rows[1]["original_image"] = {"bytes": CORRUPT_JPEG, "path": None}
    rows[2]["edit_prompt"] = " ".join(["word"] * 600)  # over-long
    write_ip2p_rows(tmp_path / "t.parquet", rows)
    data = OmegaConf.structured(FinetuneDataConfig(input=str(tmp_path / "t.parquet"), max_length=256, batch_size=3,
                                                   num_workers=0, heldout_fraction=0.0))
    mllm = OmegaConf.structured(MLLMConfig(path=str(tiny_llava_dir), dtype="float32", device="cpu"))
    dm = EditTripletDataModule(data, mllm, skip_dir=tmp_path / "skipped")
    dm.setup()
    loader = dm._loader([BatchRequest([0, 1, 2], 0, 0), BatchRequest([1, 2], 0, 1)])
    first, second = list(loader)
    assert first["keys"] == [dm.index.keys[0]] and int(first["num_real"]) == 1
    assert [s["reason"] for s in first["skipped"]] == ["corrupt_image", "over_long"]
    assert int(second["num_real"]) == 0 and second["labels"].eq(-100).all()  # placeholder only: no loss
    for batch in (first, second):
        dm._list_skipped(batch["skipped"], "train", 0)
    assert skip_summary(tmp_path / "skipped") == {"train": {"corrupt_image": 1, "over_long": 1}, "heldout": {}}
    lines = (tmp_path / "skipped" / "rank0.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["key"] == dm.index.keys[1]
    assert IP2P_SCHEMA.names[:2] == ["original_prompt", "original_image"]
