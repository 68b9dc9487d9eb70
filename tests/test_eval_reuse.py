"""A reused run directory never reports old numbers under a new config: images are checked against
the config, scores carry the fingerprint of their scorer and image, descriptions are merged, every
table uses the current prompt set intersected across arms, and config changes are recorded."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from img_lightning.config.eval import EvalConfig, ScorerConfig
from img_lightning.eval_run import ImageStore, PromptRecord
from img_lightning.evaluation.pipeline import record_config
from img_lightning.evaluation.report import ReportError, ReportInputs, summarize, write_report
from img_lightning.evaluation.scorers.base import Scorer
from img_lightning.evaluation.scoring import merge_descriptions, read_scores, score_run
from img_lightning.generation.provenance import StaleRunError, check_stored_images, expected_meta


class Counting(Scorer):
    """Scores the red channel's mean; counts calls; its description carries a version."""

    def __init__(self, version: str, name: str = "m") -> None:
        self.version, self.name, self.calls = version, name, 0

    def _score_batch(self, images, prompts):
        self.calls += len(images)
        return torch.tensor([float(im.getpixel((0, 0))[0]) for im in images])

    def info(self):
        return {"kind": "counting", "version": self.version, "sha256": "0" * 64, "exact": True}


def _cfg(tmp_path, **over):
    cfg = OmegaConf.structured(EvalConfig)
    cfg.run_dir = str(tmp_path)
    cfg.img.rounds = 0
    cfg.img.control = False
    cfg.scorers = [OmegaConf.merge(OmegaConf.structured(ScorerConfig), {"kind": "counting", "name": "m"})]
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in over.items()]))


def _prompts(texts):
    return [PromptRecord(f"{i:05d}", t) for i, t in enumerate(texts)]


def _generate(cfg, prompts, run_dir, red=10):
    store = ImageStore(run_dir, "base")
    for p in prompts:
        store.save(p.uid, Image.new("RGB", (8, 8), (red, 0, 0)), expected_meta(cfg, "base", p, None))
    return store


def test_a_changed_scorer_or_a_regenerated_image_is_scored_again(tmp_path):
    cfg, prompts = _cfg(tmp_path), _prompts(["a red cube", "a blue ball"])
    _generate(cfg, prompts, tmp_path)
    a = Counting("A")
    assert score_run(cfg, prompts, tmp_path, ["base"], "0of1", {"m": a}, progress=False) == {"base": {"m": 2}}
    assert score_run(cfg, prompts, tmp_path, ["base"], "0of1", {"m": a}, progress=False) == {"base": {"m": 0}}
    b = Counting("B")  # another scorer version: nothing of version A is reused
    assert score_run(cfg, prompts, tmp_path, ["base"], "0of1", {"m": b}, progress=False) == {"base": {"m": 2}}
    assert b.calls == 2
    # the image is regenerated (same config, other pixels): its old score is stale
    ImageStore(tmp_path, "base").save("00001", Image.new("RGB", (8, 8), (99, 0, 0)),
                                      expected_meta(cfg, "base", prompts[1], None))
    assert score_run(cfg, prompts, tmp_path, ["base"], "0of1", {"m": b}, progress=False) == {"base": {"m": 1}}
    from img_lightning.evaluation.scoring import image_hashes, scorer_fingerprint

    fresh = read_scores(tmp_path, "base", "m", scorer_fingerprint(b.describe()),
                        image_hashes(ImageStore(tmp_path, "base"), ["00000", "00001"]))
    assert fresh == {"00000": 10.0, "00001": 99.0}


def test_an_image_another_arm_scored_byte_for_byte_takes_its_score(tmp_path):
    """control = base (released SDXL settings): its copies are not scored again, the records say so;
    an image that differs in one pixel is scored."""
    cfg, prompts = _cfg(tmp_path), _prompts(["a red cube", "a blue ball"])
    base = _generate(cfg, prompts, tmp_path)
    control = ImageStore(tmp_path, "control")
    control.save_copy("00000", base.path_for("00000"), {"reused_from": "base"})
    control.save("00001", Image.new("RGB", (8, 8), (77, 0, 0)), {})
    a = Counting("A")
    counts = score_run(cfg, prompts, tmp_path, ["base", "control"], "0of1", {"m": a}, progress=False)
    assert counts == {"base": {"m": 2}, "control": {"m": 1}} and a.calls == 3
    assert read_scores(tmp_path, "control", "m") == {"00000": 10.0, "00001": 77.0}
    lines = [json.loads(line) for line in (tmp_path / "scores" / "control" / "m.0of1.jsonl").read_text().splitlines()]
    assert [(r["uid"], r.get("reused_from")) for r in lines] == [("00000", "base"), ("00001", None)]
    # another scorer version takes nothing from the first's records
    b = Counting("B")
    assert score_run(cfg, prompts, tmp_path, ["control"], "0of1", {"m": b}, progress=False) == {"control": {"m": 2}}


def test_stored_images_of_another_prompt_file_or_seed_are_refused(tmp_path):
    cfg = _cfg(tmp_path)
    _generate(cfg, _prompts(["a red cube", "a blue ball"]), tmp_path)
    check_stored_images(cfg, _prompts(["a red cube", "a blue ball"]), tmp_path)  # same config: fine
    # another prompt file with the same uids (T2I-CompBench files all start at 00000)
    with pytest.raises(StaleRunError) as err:
        check_stored_images(cfg, _prompts(["a red cube", "a square plate"]), tmp_path)
    text = str(err.value)
    assert str(tmp_path) in text and "base/00001" in text
    assert "prompt: stored 'a blue ball', now 'a square plate'" in text
    assert "new run_dir" in text and "1 stored image(s)" in text
    with pytest.raises(StaleRunError, match="seed: stored"):
        check_stored_images(_cfg(tmp_path, **{"generation.seed": 7}), _prompts(["a red cube"]), tmp_path)
    with pytest.raises(StaleRunError, match="steps: stored 50, now 20"):
        check_stored_images(_cfg(tmp_path, **{"generation.sampler.steps": 20}), _prompts(["a red cube"]), tmp_path)


def test_img_images_record_the_aligner_checkpoint_sha256(tmp_path):
    ckpt_a, ckpt_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ckpt_a.write_bytes(b"aligner A")
    ckpt_b.write_bytes(b"aligner B")
    cfg = _cfg(tmp_path / "run", **{"img.rounds": 1, "img.aligner.checkpoint": str(ckpt_a)})
    prompts = _prompts(["a red cube"])
    meta = expected_meta(cfg, "img_r1", prompts[0], "sha-a")
    assert meta["aligner_sha256"] == "sha-a" and meta["ip_scale"] == 0.2 and meta["passes"] == 3
    from img_lightning.generation.provenance import aligner_sha256

    ImageStore(tmp_path / "run", "img_r1").save("00000", Image.new("RGB", (8, 8)),
                                                 expected_meta(cfg, "img_r1", prompts[0], aligner_sha256(cfg)))
    check_stored_images(cfg, prompts, tmp_path / "run")
    # the same path, another file (a retrained aligner saved over the old one) is caught by its hash
    ckpt_a.write_bytes(b"aligner A, retrained")
    with pytest.raises(StaleRunError, match="img_r1/00000: aligner_sha256"):
        check_stored_images(cfg, prompts, tmp_path / "run")
    # a report on a machine without the aligner file cannot compare its hash (the rest still is)
    ckpt_a.unlink()
    check_stored_images(cfg, prompts, tmp_path / "run")
    with pytest.raises(StaleRunError, match="ip_scale: stored 0.2, now 0.5"):
        changed = _cfg(tmp_path / "run",
                       **{"img.rounds": 1, "img.ip_scale": 0.5, "img.aligner.checkpoint": str(ckpt_a)})
        check_stored_images(changed, prompts, tmp_path / "run")


def test_descriptions_are_merged_and_a_metric_without_one_is_refused(tmp_path):
    merge_descriptions(tmp_path, {"m": Counting("A")})
    merge_descriptions(tmp_path, {"other": Counting("A", name="other")})
    stored = json.loads((tmp_path / "scores" / "metrics.json").read_text())
    assert set(stored) == {"m", "other"} and stored["m"]["version"] == "A"
    prompts = _prompts(["p"])
    inp = ReportInputs(prompts, {"base": {"m": {"00000": 1.0}, "x": {"00000": 1.0}}}, {}, {"m": stored["m"]})
    with pytest.raises(ReportError, match="metric 'x' has scores but no stored description"):
        summarize(inp, num_resamples=10)


def test_every_table_uses_the_prompt_set_intersected_across_arms(tmp_path):
    prompts = _prompts(["p0", "p1", "p2", "p3"])
    desc = {"m": {"name": "m", "kind": "counting", "exact": True}}
    base = {f"{i:05d}": float(i) for i in range(4)}
    base["99999"] = 1000.0  # a uid of an older, larger prompt set: never in any table
    img = {f"{i:05d}": float(i) + 1 for i in range(2)}  # the IMG arm was scored on 2 prompts only
    inp = ReportInputs(prompts, {"base": {"m": base}, "img_r1": {"m": img}}, {}, desc, ["img_r1"])
    s = summarize(inp, num_resamples=10)
    assert s["n"] == {"m": 2} and s["means"]["m"]["base"]["n"] == 2
    assert s["means"]["m"]["base"]["value"] == 0.5 and s["means"]["m"]["img_r1"]["value"] == 1.5
    assert [c["n"] for c in s["comparisons"]] == [2]
    warning = next(n for n in s["notes"] if n.startswith("Warning: m"))
    assert "img_r1 2 of 4" in warning and "n=2" in warning
    paths = write_report(inp, tmp_path / "report", num_resamples=10)
    md = paths["table_md"].read_text().splitlines()
    assert md[2] == "| base | 0.5000 |" and md[3] == "| img_r1 | 1.5000 |" and md[4] == "| n | 2 |"
    assert paths["table_tsv"].read_text().splitlines()[-1] == "n\t2"
    assert any("img_r1 2 of 4" in line for line in md)
    html = paths["html"].read_text()
    assert "img_r1 2 of 4" in html and "<td>n</td>" in html


def test_a_changed_config_is_recorded_beside_the_first(tmp_path):
    prompts = _prompts(["a"])
    assert record_config(tmp_path, _cfg(tmp_path), prompts, "all") == tmp_path
    first = (tmp_path / "config.yaml").read_text()
    second_task = _cfg(tmp_path, **{"chunk.index": 1, "chunk.count": 2})
    assert record_config(tmp_path, second_task, prompts, "generate") == tmp_path
    target = record_config(tmp_path, _cfg(tmp_path, **{"report.bootstrap": 10}), prompts, "report")
    assert target == tmp_path / "reruns" / "001" and (tmp_path / "config.yaml").read_text() == first
    changes = json.loads((target / "changes.json").read_text())
    assert changes["config_changes"] == {"report.bootstrap": [1000, 10]} and changes["stage"] == "report"
    assert record_config(tmp_path, _cfg(tmp_path), _prompts(["b"]), "score") == tmp_path / "reruns" / "002"


def test_blip_vqa_is_a_proxy_even_when_an_old_description_says_exact():
    from img_lightning.evaluation.report import is_proxy

    assert is_proxy({"kind": "blip_vqa", "exact": True})
