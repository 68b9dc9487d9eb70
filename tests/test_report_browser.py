"""The HTML pages a researcher reads, in a real browser: the demo's evaluation report and the MLLM
finetune's evaluation page, headless Chromium at 1280 px. Nothing reaches past the window's right
edge, every image loads, no "nan"/"None"/object repr shows; each screenshot's path is printed at the
end of the test log (artifacts: ``IMG_TEST_ARTIFACTS``, else pytest's temporary folder)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from browser import NO_BROWSER, find_browser, measure, problems

pytestmark = pytest.mark.skipif(find_browser() is None, reason=NO_BROWSER)
WIDTH = 1280


def test_the_demo_evaluation_report_reads_well_at_1280_px(tiny_eval_world, tmp_path, artifacts):
    from img_lightning.tiny.demo_eval import run_demo_eval

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square left of a blue circle\na small green triangle above a large yellow star\n"
                       "two purple circles\n")
    html = run_demo_eval(tmp_path, prompts_path=prompts, limit=3, progress=False,
                         extra=["prompts.format=text", "prompts.name=demo-heldout"], **tiny_eval_world)
    result = measure(html, artifacts / "demo-eval-report.png", WIDTH)
    assert result["viewport"] <= WIDTH and not problems(result), "\n".join(problems(result))
    srcs = [i["src"] for i in result["images"]]
    # base = control, IMG
    assert "winrate.png" in srcs and sum(s.endswith(".png") and "images/" in s for s in srcs) == 3 * 2
    assert "base = control" in result["text"] and Image.open(result["screenshot"]).width == WIDTH


def test_the_finetune_evaluation_page_reads_well_at_1280_px(tiny_llava_dir, tmp_path, artifacts):
    from finetune_utils import tiny_finetune_config
    from img_lightning.finetune.evaluate import run_eval
    from preprocessing.demo_data import write_edit_triplets_parquet

    data = tmp_path / "t.parquet"
    write_edit_triplets_parquet(data, 40, seed=4)
    cfg = tiny_finetune_config(data, tiny_llava_dir, tmp_path, "ev", **{"eval.finetuned": str(tiny_llava_dir)})
    page = run_eval(cfg).out_dir / "index.html"
    result = measure(page, artifacts / "finetune-eval.png", WIDTH)
    assert not problems(result), "\n".join(problems(result))
    assert len(result["images"]) == json.loads((page.parent / "metrics.json").read_text())["base"]["n"] > 0


def test_the_checks_find_what_they_look_for(tmp_path, artifacts):
    """A page with each fault: the checks are not vacuous."""
    Image.new("RGB", (1620, 40), "red").save(tmp_path / "wide.png")
    page = tmp_path / "bad.html"
    page.write_text('<!doctype html><html><body><p><img src="wide.png"></p><img src="missing.png">'
                    '<table><tr><td style="white-space:nowrap">' + "x" * 400 + '</td></tr></table>'
                    "<p>score: nan, &lt;object object at 0x7f00aa&gt;</p></body></html>")
    found = "\n".join(problems(measure(page, artifacts / "faults.png", WIDTH)))
    for what in ("px wide in a", "<img> reaches", "<td> reaches", "missing.png did not load", "'nan'", "object at 0x"):
        assert what in found, what
