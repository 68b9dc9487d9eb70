"""Prompt-set loaders on the official files in ../shared/benchmarks (every parsing quirk)."""

import json

import pytest

from bench_paths import BENCH, requires_bench
from img_lightning.eval_run.prompts import chunk
from img_lightning.evaluation.prompts import (
    PromptFileError,
    load_drawbench,
    load_hpd_benchmark,
    load_hpd_csv,
    load_partiprompts,
    load_pickapic,
    load_prompts,
    load_t2i_compbench,
    load_text,
)

pytestmark = requires_bench


def test_partiprompts_keeps_literal_quotes():
    recs = load_partiprompts(BENCH / "partiprompts" / "PartiPrompts.tsv")
    assert len(recs) == 1632 and len({r.text for r in recs}) == 1632
    assert len({r.category for r in recs}) == 12 and len({r.meta["challenge"] for r in recs}) == 11
    giggle = [r for r in recs if "G I G G L E" in r.text]
    assert len(giggle) == 1 and giggle[0].text.startswith('"G I G G L E" painted')
    assert recs[0].uid == "00000" and recs[0].category == "Abstract"


def test_t2i_compbench_crlf_and_missing_final_newline():
    for name, n in [("color_val.txt", 300), ("shape_val.txt", 300), ("texture_val.txt", 300),
                    ("spatial_val.txt", 300), ("non_spatial_val.txt", 300), ("3d_spatial_val.txt", 300),
                    ("numeracy_val.txt", 300)]:
        recs = load_t2i_compbench(BENCH / "t2i-compbench" / name)
        assert len(recs) == n, name
        assert not any("\r" in r.text or r.text != r.text.strip() for r in recs)
        assert recs[0].category == name.split("_val")[0]
    old = load_t2i_compbench(BENCH / "t2i-compbench" / "color_val.pre-3310c2f.txt")
    assert len(old) == 300 and len({r.text for r in old}) == 295 and old[0].category == "color"
    # the last line has no newline and must still be read
    last = (BENCH / "t2i-compbench" / "color_val.txt").read_bytes().splitlines()[-1].decode().strip()
    assert load_t2i_compbench(BENCH / "t2i-compbench" / "color_val.txt")[-1].text == last


def test_t2i_compbench_complex_subtypes(tmp_path):
    recs = load_t2i_compbench(BENCH / "t2i-compbench" / "complex_val.txt")
    counts = {s: sum(r.subtype == s for r in recs) for s in ("spatial", "action", "spatial_action")}
    assert counts == {"spatial": 58, "action": 212, "spatial_action": 30}
    spatial_first = (BENCH / "t2i-compbench" / "complex_val_spatial.txt").read_text().splitlines()[0].strip()
    assert next(r for r in recs if r.text == spatial_first).subtype == "spatial"
    # without the subset lists beside it the loader says what is missing
    lonely = tmp_path / "complex_val.txt"
    lonely.write_bytes((BENCH / "t2i-compbench" / "complex_val.txt").read_bytes())
    with pytest.raises(PromptFileError, match="complex_val_spatial.txt"):
        load_t2i_compbench(lonely)
    assert len(load_t2i_compbench(lonely, subset_dir=BENCH / "t2i-compbench")) == 300


def test_drawbench_categories():
    recs = load_drawbench(BENCH / "drawbench" / "drawbench.csv")
    assert len(recs) == 200
    cats = {}
    for r in recs:
        cats[r.category] = cats.get(r.category, 0) + 1
    assert len(cats) == 11 and cats["Reddit"] == 38 and cats["Gary Marcus et al."] == 10
    assert any(r.meta["category_raw"] == "Gary Marcus et al. " for r in recs)


def test_hpd_csv_split_on_first_comma_only():
    recs = load_hpd_csv(BENCH / "hpd-400-unverified" / "HPD_prompt.csv")
    assert [r.uid for r in recs] == [str(i) for i in range(400)]
    assert len({r.text for r in recs}) == 400
    assert "Klimt, Nixeu" in recs[1].text  # commas inside the caption survive


def test_pickapic_csv_bom_and_empty_caption():
    recs = load_pickapic(BENCH / "pickapic-test" / "pickscore.csv")
    assert len(recs) == 500 and recs[0].uid == "0" and recs[-1].uid == "499"
    assert recs[87].uid == "87" and recs[87].text == ""
    assert len({r.text for r in recs}) == 500


def test_pickapic_parquet_deduplicates(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "test.parquet"
    pq.write_table(pa.table({"caption": ["a cat", "a dog", "a cat", " a bird "], "label_0": [1.0, 0.0, 1.0, 0.5]}),
                   path)
    recs = load_pickapic(path)
    assert [r.text for r in recs] == ["a cat", "a dog", "a bird"]
    assert [r.uid for r in recs] == ["00000", "00001", "00003"]
    assert len(load_pickapic(path, unique=False)) == 4
    pq.write_table(pa.table({"prompt": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(PromptFileError, match="caption"):
        load_pickapic(tmp_path / "bad.parquet")


def test_hpd_benchmark_style_jsons(tmp_path):
    (tmp_path / "anime.json").write_text(json.dumps(["Spongebob in the style of a cartoon.", "a fox"]))
    (tmp_path / "photo.json").write_text(json.dumps(["a street at night"]))
    recs = load_hpd_benchmark(tmp_path)
    assert [(r.uid, r.category) for r in recs] == [("anime-00000", "anime"), ("anime-00001", "anime"),
                                                  ("photo-00000", "photo")]
    assert [r.category for r in load_hpd_benchmark(tmp_path / "photo.json")] == ["photo"]
    (tmp_path / "bad.json").write_text(json.dumps({"prompts": []}))
    with pytest.raises(PromptFileError, match="list of prompt strings"):
        load_hpd_benchmark(tmp_path / "bad.json")


def test_text_and_dispatch(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"\xef\xbb\xbffirst\r\n\r\nsecond\nthird")
    assert [r.text for r in load_text(f)] == ["first", "second", "third"]
    recs = load_prompts("t2i_compbench", BENCH / "t2i-compbench" / "color_val.txt", limit=5)
    assert len(recs) == 5
    parti = load_prompts("partiprompts", BENCH / "partiprompts" / "PartiPrompts.tsv", categories=["Abstract"])
    assert parti and all(r.category == "Abstract" for r in parti)
    with pytest.raises(PromptFileError, match="unknown prompt format"):
        load_prompts("nope", f)
    with pytest.raises(PromptFileError, match="not found"):
        load_prompts("text", tmp_path / "missing.txt")
    # chunks partition the set, keep uids, and are disjoint
    parts = [chunk(recs, i, 2) for i in range(2)]
    assert sorted(r.uid for p in parts for r in p) == [r.uid for r in recs]


def test_t2i_compbench_directory_needs_all_six_categories(tmp_path):
    (tmp_path / "color_val.txt").write_bytes((BENCH / "t2i-compbench" / "color_val.txt").read_bytes())
    with pytest.raises(PromptFileError, match="shape_val.txt"):
        load_t2i_compbench(tmp_path)
