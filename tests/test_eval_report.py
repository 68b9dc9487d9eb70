"""The HTML/Markdown report: Table-1 layout in config order, proxy headers and footnotes, version
and checkpoint hashes, unscored images counted and shown (with the unparsed answers)."""

import json

from PIL import Image

from img_lightning.eval_run import PromptRecord
from img_lightning.evaluation.report import ReportInputs, paste_table, summarize, write_report

METRICS = {
    "clip": {"name": "clip", "label": "CLIP Score", "kind": "clip", "exact": True,
             "model": "openai/clip-vit-large-patch14", "sha256": "a" * 64, "reference": "CLIPScore",
             "scale": "1 x cos"},
    "spatial": {"name": "spatial", "label": "Spatial", "kind": "spatial_proxy", "exact": False,
                "note": "OWLv2 stands in for UniDet", "sha256": "b" * 64},
    "hps": {"name": "hps", "label": "HPS", "kind": "hps", "exact": True, "version": "v2.1", "sha256": "c" * 64},
    "mllm": {"name": "mllm", "label": "MLLM <grader>", "kind": "mllm_grader", "exact": False,
             "note": "local MLLM", "rubric_sha256": "d" * 64},
}


def _inputs(tmp_path):
    prompts = [PromptRecord(f"{i:05d}", f"prompt <{i}>", category="color") for i in range(4)]
    images, scores = {}, {}
    for arm, shift in (("base", 0.0), ("control", 0.0), ("img_r1", 0.5)):
        images[arm] = {}
        for p in prompts:
            path = tmp_path / "images" / arm / f"{p.uid}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8)).save(path)
            images[arm][p.uid] = str(path)
        scores[arm] = {m: {p.uid: float(i) / 10 + shift for i, p in enumerate(prompts)} for m in METRICS}
    # two unparseable MLLM answers in the IMG arm: no score, counted, the answers shown
    for uid in ("00001", "00002"):
        scores["img_r1"]["mllm"][uid] = float("nan")
    answers = tmp_path / "scores" / "img_r1" / "answers" / "mllm.0of1.jsonl"
    answers.parent.mkdir(parents=True)
    answers.write_text("".join(json.dumps({"uid": u, "parsed": u == "00000", "error": None if u == "00000" else
                                           "no JSON object in the answer", "answer": f"I like it <b>{u}</b>"}) + "\n"
                               for u in ("00000", "00001", "00002")))
    return ReportInputs(prompts, scores, images, METRICS, ["img_r1"], run_dir=tmp_path)


def test_report_table_layout_proxies_hashes_and_unscored(tmp_path):
    inp = _inputs(tmp_path)
    s = summarize(inp, num_resamples=50)
    assert s["labels"] == {"clip": "CLIP Score", "spatial": "Spatial (proxy) [1]", "hps": "HPS",
                           "mllm": "MLLM <grader> (proxy) [2]"}
    foot = [n for n in s["notes"] if n.startswith("[")]
    assert foot[0] == "[1] Spatial: OWLv2 stands in for UniDet" and foot[1].startswith("[2] MLLM")
    # the NaN answers of img_r1 take those prompts out of every arm's MLLM mean, and the report says so
    assert any(n.startswith("Warning: MLLM") and "n=2 of 4" in n for n in s["notes"])
    assert any("hpsv2.score() returns the raw cosine" in n for n in s["notes"])
    assert s["unscored"]["mllm"]["img_r1"]["count"] == 2 and s["unscored"]["mllm"]["img_r1"]["of"] == 4
    assert [e["uid"] for e in s["unscored"]["mllm"]["img_r1"]["examples"]] == ["00001", "00002"]
    assert s["means"]["mllm"]["img_r1"]["n"] == 2 and s["means"]["mllm"]["img_r1"]["value"] == 0.5 + 0.15
    # one row per arm, columns in config order: rows paste next to a published table
    table = paste_table(s)
    assert table[0] == ["arm", "CLIP Score", "Spatial (proxy) [1]", "HPS", "MLLM <grader> (proxy) [2]"]
    assert table[1] == ["base", "0.1500", "0.1500", "0.1500", "0.1500"]
    assert table[3][0] == "img_r1" and table[3][4] == "0.6500"

    paths = write_report(inp, tmp_path / "report", num_resamples=50)
    assert len(s["comparisons"]) == 8 and Image.open(paths["chart"]).width == 880  # taller with more bars, never wider
    html = paths["html"].read_text()
    for h in ("a" * 64, "b" * 64, "c" * 64, "d" * 64):  # every checkpoint / rubric fingerprint is shown
        assert h in html
    assert "v2.1" in html and "Spatial (proxy) [1]" in html and "2 of 4 unscored" in html
    assert "no JSON object in the answer" in html
    # Jinja2 autoescaping: prompt, label and answer text never become markup
    assert "prompt &lt;3&gt;" in html and "MLLM &lt;grader&gt;" in html and "&lt;b&gt;00001&lt;/b&gt;" in html
    assert "I like it <b>" not in html
    md = paths["table_md"].read_text().splitlines()
    assert md[0] == "| arm | CLIP Score | Spatial (proxy) [1] | HPS | MLLM <grader> (proxy) [2] |"
    assert md[2].startswith("| base | 0.1500") and any(line.startswith("[1] Spatial") for line in md)
    assert paths["table_tsv"].read_text().splitlines()[0].split("\t")[1] == "CLIP Score"


def test_an_arm_with_another_arms_images_is_one_row_and_compared_once(tmp_path):
    inp = _inputs(tmp_path)
    inp.same_images = {"control": "base"}
    s = summarize(inp, num_resamples=20)
    assert s["arms"] == ["base", "img_r1"] and s["arm_labels"]["base"] == "base = control"
    assert {c["versus"] for c in s["comparisons"]} == {"base"}
    assert any(n.startswith("control = base: every control image is the base image") for n in s["notes"])
    assert [row[0] for row in paste_table(s)] == ["arm", "base = control", "img_r1", "n"]
    paths = write_report(inp, tmp_path / "report", num_resamples=20)
    html = paths["html"].read_text()
    assert "<td>base = control</td>" in html and "<td>control</td>" not in html
    header = paths["csv"].read_text().splitlines()[0]
    assert "control/clip" in header and "control/image" in header  # the per-prompt file keeps every arm
