"""`img-eval all` end to end on tiny SDXL + tiny IP-Adapter + tiny LLaVA + tiny aligner, resumed."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from bench_paths import BENCH, requires_bench
from img_lightning.cli.eval import main
from img_lightning.evaluation.pipeline import resolve_config
from img_lightning.tiny.demo_eval import DEMO_CONFIG, DEMO_RECIPE, run_demo_eval, tiny_eval_overrides

COLOR = BENCH / "t2i-compbench" / "color_val.txt"
pytestmark = requires_bench


def _first_prompt() -> str:
    return COLOR.read_text(encoding="utf-8").splitlines()[0].strip()


@pytest.fixture(scope="module")
def world(tiny_eval_world):
    return tiny_eval_world


def _args(world, run_dir, limit=3):
    return [str(DEMO_CONFIG), *tiny_eval_overrides(run_dir, prompts_path=COLOR, limit=limit, **world),
            f"recipe={DEMO_RECIPE}"]


def _mtimes(run_dir):
    return {p: p.stat().st_mtime_ns for p in (run_dir / "images").rglob("*.png")}


def test_img_eval_all_end_to_end_and_resume(world, tmp_path, capsys):
    # first run through the img-demo helper (= `img-eval all configs/eval/demo.yaml ...`)
    html = run_demo_eval(tmp_path, prompts_path=COLOR, limit=3, progress=False, **world)
    run_dir = tmp_path / "eval"
    assert html == run_dir / "report" / "index.html" and _first_prompt() in html.read_text()
    out = capsys.readouterr().out
    assert "new images: {'base': 3, 'control': 3, 'img_r1': 3}" in out
    # the released SDXL settings make control the base image: copied and said so, its scores taken over
    assert "control = base: its settings equal base's" in out and "'control': {'hps': 0," in out
    for arm in ("base", "control", "img_r1"):
        assert sorted(p.name for p in (run_dir / "images" / arm).iterdir()) == ["00000.png", "00001.png", "00002.png"]
        meta = [json.loads(line) for line in (run_dir / "metadata" / f"{arm}.0of1.jsonl").read_text().splitlines()]
        assert [m["uid"] for m in meta] == ["00000", "00001", "00002"]
    meta = json.loads((run_dir / "metadata" / "img_r1.0of1.jsonl").read_text().splitlines()[0])
    base_meta = json.loads((run_dir / "metadata" / "base.0of1.jsonl").read_text().splitlines()[0])
    assert meta["seed"] == base_meta["seed"] and meta["prompt"] == base_meta["prompt"] == _first_prompt()
    assert meta["ip_scale"] == 0.2 and meta["passes"] == 3 and meta["steps"] == 2
    # control = same settings at IP scale 0 (identical to base here); IMG changes the image
    base, control, img = (np.asarray(Image.open(run_dir / "images" / a / "00000.png"), dtype=int)
                          for a in ("base", "control", "img_r1"))
    assert np.abs(base - control).max() == 0 and np.abs(img - base).max() > 0
    report = json.loads((run_dir / "report" / "report.json").read_text())
    scored = ("hps", "pickscore", "blip_vqa", "aesthetic", "image_reward")
    assert list(report["means"]) == [*scored, "mllm"]  # config order = table column order
    assert {(c["versus"], c["metric"]) for c in report["comparisons"]} >= {("base", m) for m in scored}
    assert report["arms"] == ["base", "img_r1"] and report["same_images"] == {"control": "base"}
    assert all(c["versus"] == "base" for c in report["comparisons"])  # vs control = vs base: not repeated
    assert report["arm_labels"]["base"] == "base = control"
    assert report["metrics"]["hps"]["version"] == "tiny"
    assert all(c["n"] == 3 for c in report["comparisons"] if c["metric"] in scored)
    # the tiny LLaVA grader answers gibberish: no score, counted and shown, never a default
    mllm = report["metrics"]["mllm"]
    assert mllm["kind"] == "mllm_grader" and len(mllm["rubric_sha256"]) == 64 and mllm["exact"] is False
    answers_file = run_dir / "scores" / "base" / "answers" / "mllm.0of1.jsonl"
    answers = [json.loads(line) for line in answers_file.read_text().splitlines()]
    assert len(answers) == 3 and all(isinstance(a["answer"], str) for a in answers)
    unparsed = sum(not a["parsed"] for a in answers)
    assert report["unscored"].get("mllm", {}).get("base", {}).get("count", 0) == unparsed
    page = (run_dir / "report" / "index.html").read_text()
    for name in scored:  # every scorer's checkpoint fingerprint is in the HTML report
        assert report["metrics"][name]["sha256"] in page
    assert report["metrics"]["blip_vqa"]["exact"] is False and "blip_vqa (proxy) [" in page  # no spaCy here
    for f in ("index.html", "report.csv", "winrate.png", "table.md", "table.tsv"):
        assert (run_dir / "report" / f).is_file()
    # the features came from the recipe's encoders block
    cfg = resolve_config(_args(world, run_dir))
    assert cfg.encoders.mllm.batch_size == 16 and cfg.encoders.ip.batch_size == 32
    assert (run_dir / "features" / "img_r1" / "00000.safetensors").is_file()

    # resumed run: nothing is regenerated or rescored
    before = _mtimes(run_dir)
    assert main(["all", *_args(world, run_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "new images: {'base': 0, 'control': 0, 'img_r1': 0}" in out
    assert "'hps': 0" in out and "'pickscore': 3" not in out and "'mllm': 0" in out
    assert _mtimes(run_dir) == before

    # the run's own config.yaml is complete (the recipe's encoders with their local paths, the scorers'
    # files): re-running it is a no-op that reuses every image and score, and records no other config
    saved = (run_dir / "config.yaml").read_text()
    assert "recipe: null" in saved and f"recipe_applied: {DEMO_RECIPE}" in saved
    assert main(["all", str(run_dir / "config.yaml"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "new images: {'base': 0, 'control': 0, 'img_r1': 0}" in out
    counts = re.findall(r"'\w+': (\d+)", next(line for line in out.splitlines() if "new scores" in line))
    assert len(counts) == 3 * 6 and set(counts) == {"0"}  # 3 arms x 6 metrics, nothing scored again
    assert not (run_dir / "reruns").exists() and _mtimes(run_dir) == before

    # a deleted IMG image (a kill) is redone from its saved features, the rest is kept
    (run_dir / "images" / "img_r1" / "00001.png").unlink()
    assert main(["generate", *_args(world, run_dir), "--no-progress"]) == 0
    assert "new images: {'base': 0, 'control': 0, 'img_r1': 1}" in capsys.readouterr().out
    redone = np.asarray(Image.open(run_dir / "images" / "img_r1" / "00001.png"), dtype=int)
    assert redone.shape == img.shape

    # the same run dir with another prompt file reusing the uids (00000...): refused before anything runs
    shape = BENCH / "t2i-compbench" / "shape_val.txt"
    assert main(["score", *_args(world, run_dir), f"prompts.path={shape}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "base/00000" in err and "prompt: stored" in err and str(run_dir) in err and "Traceback" not in err
    # a changed setting is recorded beside the run's first config, never over it
    first = (run_dir / "config.yaml").read_text()
    assert main(["report", *_args(world, run_dir), "report.bootstrap=20", "--no-progress"]) == 0
    assert (run_dir / "config.yaml").read_text() == first
    assert "report.bootstrap" in (run_dir / "reruns" / "001" / "changes.json").read_text()
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert len(report["img_settings"]["aligner_sha256"]) == 64
    assert report["img_settings"]["aligner_sha256"] in (run_dir / "report" / "index.html").read_text()


def test_chunked_array_run_with_two_rounds(world, tmp_path, capsys):
    run_dir = tmp_path / "chunks"
    for i in range(2):
        assert main(["generate", *_args(world, run_dir, limit=2), "img.rounds=2", "img.control=false",
                     "img.free_encoders=false", "--task-index", str(i), "--num-tasks", "2", "--no-progress"]) == 0
    assert (run_dir / "metadata" / "img_r2.0of2.jsonl").is_file()
    assert (run_dir / "metadata" / "img_r2.1of2.jsonl").is_file()
    assert main(["report", *_args(world, run_dir, limit=2), "img.rounds=2", "img.control=false", "--no-progress"]) == 0
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert report["arms"] == ["base", "img_r1", "img_r2"] and report["img_arm"] == "img_r2"
    r2 = [json.loads(line) for line in (run_dir / "metadata" / "img_r2.1of2.jsonl").read_text().splitlines()]
    assert [m["uid"] for m in r2] == ["00001"] and r2[0]["source_arm"] == "img_r1"


def test_cli_errors_are_one_line(world, tmp_path, capsys):
    rc = main(["generate", str(DEMO_CONFIG), f"run_dir={tmp_path}", f"prompts.path={COLOR}",
               "img.aligner.checkpoint=x.pth", "generation.pipeline.model=nobody/no-such-sdxl"])
    err = capsys.readouterr().err
    assert rc == 2 and "nobody/no-such-sdxl" in err and "HF_HOME" in err and "Traceback" not in err
    rc = main(["generate", str(DEMO_CONFIG), f"run_dir={tmp_path}", f"prompts.path={COLOR}", "img.bogus=1"])
    assert rc == 2 and "img.bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "generate" in capsys.readouterr().out


def test_every_benchmark_and_backbone_config_loads():
    from img_lightning.config.eval import EvalConfig
    from img_lightning.config.loading import load_config

    root = DEMO_CONFIG.parent
    benchmarks = sorted((root / "benchmarks").glob("*.yaml"))
    backbones = sorted((root / "backbones").glob("*.yaml"))
    assert len(benchmarks) >= 8 and {b.stem for b in backbones} == {"sdxl", "sdxl_dpo", "flux"}
    for bench in benchmarks:
        for bb in backbones:
            cfg = load_config(EvalConfig, [bb, bench], ["run_dir=x"], require_complete=False)
            assert cfg.scorers and cfg.img.aligner.passes == 3 and cfg.img.ip_scale == 0.2
    flux = load_config(EvalConfig, [root / "backbones" / "flux.yaml"], [], require_complete=False)
    sdxl = load_config(EvalConfig, [root / "backbones" / "sdxl.yaml"], [], require_complete=False)
    assert (flux.generation.sampler.steps, flux.generation.sampler.guidance_scale) == (30, 3.5)
    assert (sdxl.generation.sampler.steps, sdxl.generation.sampler.guidance_scale) == (50, 7.5)
