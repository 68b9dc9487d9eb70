"""`img-generate` and `IMGRefiner` on the tiny models: the generation stage's own images, bit for bit."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from img_lightning.cli.eval import main as eval_main
from img_lightning.cli.generate import main as generate_main
from img_lightning.tiny.demo_eval import DEMO_CONFIG, DEMO_RECIPE, tiny_eval_overrides

PROMPTS = ["a red square left of a blue circle", "a green triangle"]
# batched CPU kernels round differently
ONE_AT_A_TIME = ["generation.pipeline.batch_size=1", "encoders.mllm.batch_size=1"]


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def setting(tiny_eval_world, tmp_path_factory):
    """`img-eval generate` (2 IMG rounds, control off) over PROMPTS: the images to reproduce."""
    root = tmp_path_factory.mktemp("generate")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    config = [str(DEMO_CONFIG), *tiny_eval_overrides(root / "eval", prompts_path=prompts, **tiny_eval_world),
              f"recipe={DEMO_RECIPE}", "prompts.format=text", "img.rounds=2", "img.control=false", *ONE_AT_A_TIME]
    assert eval_main(["generate", *config, "--no-progress"]) == 0
    run = root / "eval"
    meta = {arm: {json.loads(line)["uid"]: json.loads(line)
                  for line in (run / "metadata" / f"{arm}.0of1.jsonl").read_text().splitlines()}
            for arm in ("base", "img_r1", "img_r2")}
    return dict(config=config, run=run, meta=meta, root=root)


def test_img_generate_makes_img_evals_images_bit_for_bit(setting, tmp_path, capsys):
    uid = "00001"
    want = setting["meta"]["img_r2"][uid]
    out = tmp_path / "out"
    assert generate_main([*setting["config"], "--prompt", want["prompt"], "--seed", str(want["seed"]), "--rounds", "2",
                          "--out", str(out)]) == 0
    assert "metadata.jsonl" in capsys.readouterr().out
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in lines] == ["base", "img_r1", "img_r2"]
    for rec in lines:
        stored = setting["run"] / "images" / rec["arm"] / f"{uid}.png"
        assert np.array_equal(_pixels(out / rec["file"]), _pixels(stored))
        stored = setting["meta"][rec["arm"]][uid]
        # the same provenance fields as img-eval's metadata, with the same values
        same = {k: v for k, v in stored.items() if k not in ("uid", "arm", "file", "constant_image")}
        assert {k: rec[k] for k in same} == same
    assert lines[2]["aligner_sha256"] and len(lines[2]["aligner_sha256"]) == 64
    strip = Image.open(out / lines[0]["strip"])
    assert strip.width > 3 * 64 and strip.height > 64  # three images side by side under their labels


def test_image_refines_the_given_pixels_and_bad_input_is_one_error(setting, tmp_path, capsys):
    uid = "00000"
    want = setting["meta"]["img_r1"][uid]
    given = setting["run"] / "images" / "base" / f"{uid}.png"
    out = tmp_path / "out"
    args = [*setting["config"], "--prompt", want["prompt"], "--seed", str(want["seed"]), "--rounds", "1"]
    assert generate_main([*args, "--image", str(given), "--out", str(out)]) == 0
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in lines] == ["base", "img_r1"] and lines[0]["source_image"] == str(given)
    assert lines[0]["file"].endswith("_given.png") and np.array_equal(_pixels(out / lines[0]["file"]), _pixels(given))
    # round 1 from img-eval's own base image is img-eval's round 1
    assert np.array_equal(_pixels(out / lines[1]["file"]), _pixels(setting["run"] / "images" / "img_r1" / f"{uid}.png"))
    # another picture is refined into another image
    other = tmp_path / "other.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(other)
    assert generate_main([*args, "--image", str(other), "--out", str(out)]) == 0
    second = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()][2:]
    assert second[0]["uid"].endswith("-2") and len(list(out.glob("*.png"))) == 6  # nothing replaced
    assert not np.array_equal(_pixels(out / second[1]["file"]), _pixels(out / lines[1]["file"]))
    capsys.readouterr()

    bad_file = tmp_path / "notes.png"
    bad_file.write_text("not an image")
    cases = [(["--image", str(tmp_path / "missing.png")], "missing.png does not exist"),
             (["--image", str(bad_file)], "notes.png is not a readable image"),
             (["--prompt", "  "], "is empty"), (["--prompts", str(tmp_path / "none.txt")], "none.txt: no such file")]
    for extra, message in cases:
        base = [a for a in args if a != "--prompt" and a != want["prompt"]] if extra[0].startswith("--prompt") else args
        assert generate_main([*base, *extra, "--out", str(tmp_path / "bad")]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not (tmp_path / "bad").exists()


def test_refiner_api_batches_and_matches_the_stage(setting, tiny_eval_world):
    from img_lightning import IMGRefiner

    meta = setting["meta"]
    r = IMGRefiner.from_config(*setting["config"])
    one = r(meta["img_r1"]["00001"]["prompt"], seed=meta["img_r1"]["00001"]["seed"], rounds=1)
    assert np.array_equal(np.asarray(one.refined), _pixels(setting["run"] / "images" / "img_r1" / "00001.png"))
    assert np.array_equal(np.asarray(one.base), _pixels(setting["run"] / "images" / "base" / "00001.png"))
    assert one.tokens[0].shape == (16, 64) and one.questions == [meta["img_r1"]["00001"]["template_id"]]
    # a list of prompts is one batched call; overrides as keyword arguments
    r2 = IMGRefiner.from_config(*setting["config"], **{"generation.pipeline.batch_size": 2}, img__rounds=1)
    both = r2(PROMPTS, seed=[meta["base"][u]["seed"] for u in ("00000", "00001")])
    assert [b.prompt for b in both] == PROMPTS and all(len(b.rounds) == 1 for b in both)
    refined = r2.refine(one.base, PROMPTS[1], seed=meta["img_r1"]["00001"]["seed"])
    assert np.array_equal(np.asarray(refined.refined), np.asarray(one.refined))  # batch of one, same inputs
    from img_lightning.generation.refiner import InputError

    with pytest.raises(InputError, match="2 seeds for 1 prompts"):
        r2("a cat", seed=[1, 2])


def test_import_is_cheap():
    code = "import sys, img_lightning; assert 'torch' not in sys.modules; print(img_lightning.IMGRefiner.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "IMGRefiner"
