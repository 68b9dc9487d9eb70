"""Pick-a-Pic reader: filtering and counting on a schema-exact fixture, file discovery, image bytes."""

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from preprocessing.demo_data import CORRUPT_JPEG, PICKAPIC_SCHEMA, _jpeg, draw_scene, make_row, write_pickapic_rows
from preprocessing.pickapic import (
    ImageFetcher,
    ReaderError,
    decode_image,
    list_parquet_files,
    pair_id_of,
    scan_pairs,
)


def _img(colour: str, rng) -> bytes:
    return _jpeg(draw_scene({"shape": "circle", "colour": colour, "size": "large", "background": "white"}, 32, rng))


@pytest.fixture()
def fixture_file(tmp_path):
    """Rows: 0 ok (jpg_0 wins), 1 ok (label_0 == 0: jpg_1 wins), 2 tie, 3 unlabelled, 4 bad labels,
    5 null caption, 6 exact duplicate of 0, 7 same images as 0 but opposite label (not a duplicate),
    8 corrupt bytes (kept by the scan, fails to decode), 9 are_different false."""
    rng = random.Random(0)
    red, blue = _img("red", rng), _img("blue", rng)
    rows = [make_row(i, f"caption {i}", red, blue, 1.0, rng) for i in range(10)]
    rows[1].update(label_0=0.0, label_1=1.0, best_image_uid=rows[1]["image_1_uid"])
    rows[2].update(label_0=0.5, label_1=0.5, best_image_uid="")
    rows[3].update(has_label=False)
    rows[4].update(label_0=1.0, label_1=1.0)
    rows[5].update(caption=None)
    rows[6] = dict(rows[0], ranking_id=999, __index_level_0__=6)
    rows[7] = dict(rows[0], label_0=0.0, label_1=1.0, best_image_uid=rows[0]["image_1_uid"], __index_level_0__=7)
    rows[8].update(jpg_1=CORRUPT_JPEG)
    rows[9].update(are_different=False)
    return write_pickapic_rows(tmp_path / "data" / "train-00000-of-00001-abc.parquet", rows, row_group_size=3), rows


def test_schema_matches_pickapic_v2(fixture_file):
    path, _ = fixture_file
    schema = pq.ParquetFile(path).schema_arrow
    expect = {"caption": pa.string(), "jpg_0": pa.binary(), "jpg_1": pa.binary(), "label_0": pa.float64(),
              "label_1": pa.float64(), "has_label": pa.bool_(), "are_different": pa.bool_(),
              "created_at": pa.timestamp("ns"), "ranking_id": pa.int64(), "user_id": pa.int64(),
              "best_image_uid": pa.string(), "image_0_uid": pa.string(), "image_1_uid": pa.string(),
              "model_0": pa.string(), "model_1": pa.string(), "num_example_per_prompt": pa.int64()}
    for name, dtype in expect.items():
        assert schema.field(name).type == dtype, name
    assert schema.names == PICKAPIC_SCHEMA.names


def test_filtering_and_counts(fixture_file):
    path, rows = fixture_file
    table = scan_pairs(str(path))
    s = table.stats
    assert (s.files, s.rows_read, s.ties_dropped, s.unlabelled, s.bad_labels, s.missing_values, s.duplicates) == \
           (1, 10, 1, 1, 1, 1, 1)
    assert s.kept == len(table) == 5  # rows 0, 1, 7, 8, 9
    assert [int(r) for r in table.row] == [0, 1, 7, 8, 9]
    by_row = {int(r): i for i, r in enumerate(table.row)}
    # label_0 == 1: jpg_0 (image_0_uid) won; label_0 == 0: jpg_1 won
    assert table.winner_uid[by_row[0]] == rows[0]["image_0_uid"] and table.winner_index[by_row[0]] == 0
    assert table.winner_uid[by_row[1]] == rows[1]["image_1_uid"] and table.winner_index[by_row[1]] == 1
    assert table.loser_uid[by_row[1]] == rows[1]["image_0_uid"]
    assert table.pair_id[by_row[0]] == pair_id_of("caption 0", rows[0]["image_0_uid"], rows[0]["image_1_uid"])
    assert table.pair_id[by_row[7]] != table.pair_id[by_row[0]]  # opposite preference is a different pair
    assert [int(g) for g in table.row_group] == [0, 0, 2, 2, 3]  # row groups of 3 rows
    assert table.ranking_id[by_row[0]] == rows[0]["ranking_id"]


def test_require_different_and_limit(fixture_file):
    path, _ = fixture_file
    t = scan_pairs(str(path), require_different=True)
    assert t.stats.not_different == 1 and len(t) == 4
    t = scan_pairs(str(path), limit=2)
    assert len(t) == 2 and t.stats.over_limit == 3 and [int(r) for r in t.row] == [0, 1]


def test_image_bytes_and_decoding(fixture_file):
    path, rows = fixture_file
    table = scan_pairs(str(path))
    fetched = ImageFetcher(table, cache_row_groups=1).fetch(list(range(len(table)))[::-1])
    by_row = {int(r): j for j, r in enumerate(table.row[::-1])}
    winner, loser = fetched[by_row[1]]
    assert winner == rows[1]["jpg_1"] and loser == rows[1]["jpg_0"]
    img, why = decode_image(winner)
    assert img is not None and img.mode == "RGB" and why is None
    w8, l8 = fetched[by_row[8]]  # row 8: jpg_0 won, jpg_1 corrupt
    assert decode_image(w8)[0] is not None
    bad, why = decode_image(l8)
    assert bad is None and "undecodable" in why
    assert decode_image(None) == (None, "missing image bytes")
    assert decode_image(_jpeg(draw_scene({"shape": "square", "colour": "red", "size": "small",
                                          "background": "blue"}, 16, random.Random(1)))[:40])[0] is None


def test_missing_column_is_a_clear_error(tmp_path):
    table = pa.table({"caption": ["x"], "jpg_0": [b"a"], "label_0": [1.0], "label_1": [0.0],
                      "image_0_uid": ["u0"], "image_1_uid": ["u1"]})
    path = tmp_path / "broken.parquet"
    pq.write_table(table, path)
    with pytest.raises(ReaderError, match=r"broken\.parquet.*'jpg_1'"):
        scan_pairs(str(path))


def test_empty_files_are_counted_and_discovery(tmp_path, fixture_file):
    path, _ = fixture_file
    empty = write_pickapic_rows(tmp_path / "data" / "train-00001-of-00002-def.parquet", [])
    write_pickapic_rows(tmp_path / "data" / "validation-00000-of-00001-x.parquet", [])
    files = list_parquet_files(str(tmp_path), "train")  # a directory: recursive, the split's files only
    assert len(list_parquet_files(str(tmp_path))) == 3
    assert files == [str(path), str(empty)]
    t = scan_pairs(str(tmp_path))
    assert t.stats.files == 2 and t.stats.empty_files == 1 and len(t) == 5
    found = list_parquet_files(str(tmp_path / "data" / "val*.parquet"))
    assert found[0].endswith("validation-00000-of-00001-x.parquet")
    with pytest.raises(ReaderError, match="matches no parquet file"):
        list_parquet_files(str(tmp_path / "nothing-*.parquet"))
    # a folder with other splits' shards only: never read as the asked split
    others = tmp_path / "others"
    for name in ("validation-00000-of-00001-x.parquet", "test_unique-00000-of-00001-y.parquet"):
        write_pickapic_rows(others / name, [])
    from img_lightning.parquet_files import SplitNotFoundError

    with pytest.raises(SplitNotFoundError, match=r"\['test_unique', 'validation'\] but none of split 'train'"):
        list_parquet_files(str(others), "train")
    assert len(list_parquet_files(str(others), "validation")) == 1
    assert len(list_parquet_files(str(others / "*.parquet"), "train")) == 2  # a glob is taken as given
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(ReaderError, match="bad.parquet"):
        scan_pairs(str(bad))


def test_fetcher_across_many_files_with_bounded_handles(tmp_path):
    rng = random.Random(5)
    images = {c: _img(c, rng) for c in ("red", "blue", "green")}
    expect = {}
    for f in range(3):
        rows = []
        for r in range(4):
            win, lose = images[["red", "blue", "green"][(f + r) % 3]], images["green" if (f + r) % 3 != 2 else "red"]
            rows.append(make_row(10 * f + r, f"file {f} row {r}", win, lose, 1.0, rng))
            expect[f"file {f} row {r}"] = (win, lose)
        write_pickapic_rows(tmp_path / f"train-{f:05d}-of-00003.parquet", rows, row_group_size=2)
    table = scan_pairs(str(tmp_path))
    fetcher = ImageFetcher(table, cache_row_groups=1)
    fetcher.MAX_OPEN_FILES = 1
    order = [11, 0, 7, 3, 11, 5]
    got = fetcher.fetch(order)
    assert [expect[table.caption[i]] for i in order] == got
    assert len(fetcher._files) == 1


def test_empty_captions_and_same_uid_pairs_are_counted_and_dropped(tmp_path):
    rng = random.Random(1)
    red, blue = _img("red", rng), _img("blue", rng)
    rows = [make_row(i, f"caption {i}", red, blue, 1.0, rng) for i in range(5)]
    rows[1].update(caption="   ")
    rows[2].update(caption="")
    rows[3].update(image_1_uid=rows[3]["image_0_uid"])
    path = write_pickapic_rows(tmp_path / "train-00000-of-00001.parquet", rows)
    t = scan_pairs(str(path))
    assert (t.stats.empty_captions, t.stats.same_image, len(t)) == (2, 1, 2)
    kept = scan_pairs(str(path), drop_empty_captions=False)
    assert (kept.stats.empty_captions, len(kept)) == (0, 4)


def test_labels_that_contradict_best_image_uid_or_has_label_are_never_kept(tmp_path):
    """The winner comes from label_0/label_1; a row whose best_image_uid names the other image has
    no known preference (a flipped pair would train the aligner backwards), so it is dropped and
    counted. has_label is read whatever its type."""
    rng = random.Random(2)
    red, blue = _img("red", rng), _img("blue", rng)
    rows = [make_row(i, f"caption {i}", red, blue, 1.0 if i % 2 else 0.0, rng) for i in range(6)]
    rows[1].update(best_image_uid=rows[1]["image_1_uid"])  # label_0 = 1 says image 0
    rows[2].update(best_image_uid=rows[2]["image_0_uid"])  # label_0 = 0 says image 1
    rows[3].update(best_image_uid=None)  # unknown: the labels decide
    path = write_pickapic_rows(tmp_path / "train-00000-of-00001.parquet", rows)
    t = scan_pairs(str(path))
    assert t.stats.label_uid_mismatch == 2 and len(t) == 4
    for caption, winner in zip(t.caption, t.winner_uid, strict=True):
        i = int(caption.split()[-1])
        assert winner == rows[i]["image_0_uid" if rows[i]["label_0"] == 1.0 else "image_1_uid"]
    # has_label stored as integers
    table = pq.read_table(path)
    table = table.set_column(table.schema.get_field_index("has_label"), "has_label",
                             pa.array([0, 1, 1, 1, 1, 1], type=pa.int64()))
    pq.write_table(table, tmp_path / "ints.parquet")
    assert scan_pairs(str(tmp_path / "ints.parquet")).stats.unlabelled == 1


def test_binary_caption_column_is_a_clear_error(tmp_path):
    table = pa.table({"caption": pa.array([b"\xff\xfe caption"], pa.binary()), "jpg_0": [b"a"], "jpg_1": [b"b"],
                      "label_0": [1.0], "label_1": [0.0], "image_0_uid": ["u0"], "image_1_uid": ["u1"]})
    path = tmp_path / "binary_caption.parquet"
    pq.write_table(table, path)
    with pytest.raises(ReaderError, match=r"binary_caption\.parquet.*'caption'.*binary"):
        scan_pairs(str(path))


def test_bad_image_reasons_carry_no_object_addresses():
    image, reason = decode_image(b"definitely not an image")
    assert image is None and "undecodable image" in reason
    assert "0x" not in reason
