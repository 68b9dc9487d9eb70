"""Win-rate / bootstrap arithmetic and the report files."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from img_lightning.eval_run import PromptRecord
from img_lightning.evaluation.report import ReportInputs, summarize, write_report
from img_lightning.evaluation.stats import bootstrap_indices, mean_ci, paired_comparison


def test_win_tie_loss_counts():
    a = [3.0, 2.0, 1.0, 5.0, 4.0]
    b = [1.0, 2.0, 2.0, 5.0, 3.0]
    c = paired_comparison(a, b, num_resamples=200, seed=0)
    assert c.n == 5
    assert c.win.value == pytest.approx(2 / 5)  # 3>1, 4>3
    assert c.tie.value == pytest.approx(2 / 5)  # 2=2, 5=5
    assert c.loss.value == pytest.approx(1 / 5)
    assert c.win.value + c.tie.value + c.loss.value == pytest.approx(1.0)
    assert c.mean_diff.value == pytest.approx(np.mean(np.subtract(a, b)))
    # a tolerance turns near-equal pairs into ties
    t = paired_comparison([1.0, 2.0], [1.05, 1.0], tie_tolerance=0.1)
    assert (t.win.value, t.tie.value, t.loss.value) == (0.5, 0.5, 0.0)
    with pytest.raises(ValueError, match="same length"):
        paired_comparison([1.0], [1.0, 2.0])


def test_bootstrap_matches_manual_resampling_and_is_seeded():
    rng = np.random.default_rng(3)
    x = rng.normal(size=40)
    ci = mean_ci(x, num_resamples=500, seed=7)
    idx = bootstrap_indices(40, 500, 7)
    means = x[idx].mean(axis=1)
    assert ci.value == pytest.approx(x.mean())
    assert ci.low == pytest.approx(np.quantile(means, 0.025))
    assert ci.high == pytest.approx(np.quantile(means, 0.975))
    assert mean_ci(x, 500, seed=7) == ci
    assert mean_ci(x, 500, seed=8) != ci
    assert ci.low < ci.value < ci.high
    # paired CI uses the same resampled prompts for the win indicator
    a, b = rng.normal(size=40), rng.normal(size=40)
    c = paired_comparison(a, b, num_resamples=500, seed=7)
    wins = (a > b)[idx].mean(axis=1)
    assert c.win.low == pytest.approx(np.quantile(wins, 0.025))
    assert c.win.high == pytest.approx(np.quantile(wins, 0.975))


def test_all_wins_gives_degenerate_interval():
    c = paired_comparison([2.0] * 10, [1.0] * 10, num_resamples=100)
    assert (c.win.value, c.win.low, c.win.high) == (1.0, 1.0, 1.0)


def _inputs(tmp_path):
    prompts = [PromptRecord(f"{i:05d}", f"prompt {i}", category="c" if i % 2 else "d") for i in range(6)]
    images, scores = {}, {}
    for arm, shift in (("base", 0.0), ("control", 0.0), ("img_r1", 1.0)):
        images[arm] = {}
        for p in prompts:
            path = tmp_path / "images" / arm / f"{p.uid}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (int(shift * 100), 0, 0)).save(path)
            images[arm][p.uid] = str(path)
        scores[arm] = {"m": {p.uid: float(i) + shift for i, p in enumerate(prompts)}}
    scores["img_r1"]["m"]["00005"] = float("nan")  # a failed score is left out, not counted as a loss
    return ReportInputs(prompts, scores, images, {"m": {"name": "m", "kind": "spatial_proxy"}}, ["img_r1"])


def test_summary_and_report_files(tmp_path):
    inp = _inputs(tmp_path)
    s = summarize(inp, num_resamples=100)
    assert s["arms"] == ["base", "control", "img_r1"] and s["img_arm"] == "img_r1"
    assert s["means"]["m"]["img_r1"]["n"] == 5
    vs_base = next(c for c in s["comparisons"] if c["versus"] == "base")
    assert vs_base["n"] == 5 and vs_base["win"]["value"] == 1.0
    assert any("PROXY" in n for n in s["notes"])
    assert set(s["categories"]) == {"c", "d"}
    paths = write_report(inp, tmp_path / "report", num_resamples=100)
    rows = list(csv.DictReader(open(paths["csv"], encoding="utf-8")))
    assert len(rows) == 6 and rows[0]["img_r1/m"] == "1" and rows[5]["img_r1/m"] == ""
    assert rows[0]["base/image"] == "../images/base/00000.png"
    data = json.loads(paths["json"].read_text())
    assert data["comparisons"] and data["bootstrap"]["resamples"] == 100
    html = paths["html"].read_text()
    assert "prompt 3" in html and "../images/img_r1/00003.png" in html and "winrate.png" in html
    with Image.open(paths["chart"]) as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert not list((tmp_path / "report").glob(".*tmp*"))
