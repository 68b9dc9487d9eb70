"""`img-eval` fails before the expensive part: every model, checkpoint, prompt file and `???` is
checked before the first base image, all problems in one error, nothing written to the run dir."""

from __future__ import annotations

import json

import pytest
import torch

from img_lightning.aligner import ImplicitAligner
from img_lightning.cli.eval import main
from img_lightning.config.eval import EvalConfig
from img_lightning.config.loading import ConfigError, load_config, missing_keys
from img_lightning.encoders.checks import adapter_widths, check_mllm
from img_lightning.errors import Problems
from img_lightning.evaluation.pipeline import resolve_config
from img_lightning.evaluation.preflight import PreflightError, preflight
from img_lightning.models import ModelNotFoundError, check_model
from img_lightning.tiny.demo_eval import DEMO_CONFIG, DEMO_RECIPE, tiny_eval_overrides
from img_lightning.tiny.ip_adapter import SDXL_PLUS_SUBFOLDER, SDXL_PLUS_WEIGHT


def _aligner(path, guidance_dim=64, dim=64):
    torch.manual_seed(0)
    return ImplicitAligner(guidance_dim, dim, 1, 4, 16).save_safetensors(path)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "color_val.txt"  # a T2I-CompBench-style file of our own
    path.write_text("a red cube\na blue ball\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def world(tiny_sdxl_dir, tiny_ip_adapter_dir, tiny_llava_dir, tiny_scorer_dirs, tmp_path_factory):
    aligner = _aligner(tmp_path_factory.mktemp("aligner") / "aligner.safetensors")
    return dict(sdxl_dir=tiny_sdxl_dir, ip_adapter_dir=tiny_ip_adapter_dir, llava_dir=tiny_llava_dir,
                aligner_path=aligner, scorer_dirs=tiny_scorer_dirs)


def _args(world, prompts, run_dir, *extra):
    return [str(DEMO_CONFIG), *tiny_eval_overrides(run_dir, prompts_path=prompts, limit=2, **world),
            f"recipe={DEMO_RECIPE}", *extra]


def _problems(args, stage="all"):
    with pytest.raises(PreflightError) as err:
        preflight(resolve_config(args, allow_missing=True), stage)
    return str(err.value)


def test_the_tiny_world_passes_and_hands_over_the_loaded_aligner(world, prompts, tmp_path):
    ready = preflight(resolve_config(_args(world, prompts, tmp_path / "run")), "all")
    assert [p.text for p in ready.prompts] == ["a red cube", "a blue ball"]
    assert ready.aligner.dims["dim"] == 64 and not (tmp_path / "run").exists()


def test_a_missing_scorer_checkpoint_stops_img_eval_before_any_image(world, prompts, tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc = main(["all", *_args(world, prompts, run_dir, f"scorers.4.checkpoint={tmp_path / 'ImageReward.pt'}"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "scorers.4.checkpoint" in err and "ImageReward.pt" in err and "Traceback" not in err
    assert not run_dir.exists()  # no base image, no config.yaml: nothing was written


def test_every_problem_in_one_error(world, prompts, tmp_path):
    text = _problems(_args(world, prompts, tmp_path / "run", "scorers.3.checkpoint=/nowhere/mlp.pth",
                           f"prompts.path={tmp_path / 'no_such.txt'}", "encoders.mllm.path=/nowhere/llava",
                           "generation.pipeline.model=nobody/no-such-sdxl", "generation.pipeline.path=null",
                           "img.aligner.checkpoint=/nowhere/aligner.pth"))
    for key in ("scorers.3.checkpoint", "prompts.path", "encoders.mllm.path", "nobody/no-such-sdxl",
                "img.aligner.checkpoint"):
        assert key in text, key
    assert "5 problem(s)" in text and text.count("\n  - ") == 5


def test_question_marks_inside_lists_are_missing_keys(world, prompts, tmp_path):
    extra = tmp_path / "scorers.yaml"
    extra.write_text("scorers:\n  - kind: hps\n    checkpoint: ???\n  - kind: clip\n    path: ???\n")
    cfg = load_config(EvalConfig, [DEMO_CONFIG, extra], require_complete=False)
    assert {"scorers.0.checkpoint", "scorers.1.path"} <= set(missing_keys(cfg))
    args = [str(DEMO_CONFIG), str(extra), f"run_dir={tmp_path / 'run'}", f"prompts.path={prompts}",
            f"img.aligner.checkpoint={world['aligner_path']}"]
    text = _problems(args, stage="score")
    assert "scorers.0.checkpoint: has no value (???)" in text and "scorers.1.path: has no value (???)" in text
    with pytest.raises(ConfigError, match=r"scorers\.0\.checkpoint, scorers\.1\.path"):  # so does --print-config
        resolve_config(args)


@pytest.mark.parametrize("dims, words", [
    (dict(dim=32), "works on 32-wide IP tokens but the IP encoder"),
    (dict(guidance_dim=48), "expects 48-wide MLLM features but the MLLM"),
])
def test_an_aligner_of_the_wrong_width_is_refused_before_generation(world, prompts, tmp_path, dims, words):
    path = _aligner(tmp_path / "wrong.safetensors", **dims)
    text = _problems(_args(world, prompts, tmp_path / "run", f"img.aligner.checkpoint={path}"), stage="generate")
    assert "img.aligner.checkpoint" in text and words in text


def test_a_damaged_aligner_and_a_wrong_head_split(world, prompts, tmp_path):
    garbage = tmp_path / "aligner.pth"
    garbage.write_bytes(b"not a checkpoint")
    assert "not a readable aligner checkpoint" in _problems(
        _args(world, prompts, tmp_path / "run", f"img.aligner.checkpoint={garbage}"), stage="generate")
    text = _problems(_args(world, prompts, tmp_path / "run", "img.aligner.heads=2"), stage="generate")
    assert "img.aligner.checkpoint" in text and "contradicts the aligner's own metadata" in text


def test_score_checks_only_the_scorers(world, prompts, tmp_path):
    args = _args(world, prompts, tmp_path / "run", "img.aligner.checkpoint=/nowhere/aligner.pth",
                 f"scorers.2.path={tmp_path}")
    text = _problems(args, stage="score")
    assert "scorers.2.path" in text and "aligner" not in text
    assert preflight(resolve_config(args), "report").aligner is None  # report loads no model


def test_check_model_is_cheap_and_names_the_key(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ModelNotFoundError, match="no weights file"):  # a download of the configs alone
        check_model("CLIP model", "openai/clip-vit-large-patch14", str(folder), "scorers.1.path")
    (folder / "model.safetensors").write_bytes(b"garbage: never read by the check")
    assert check_model("CLIP model", "openai/clip-vit-large-patch14", str(folder), "scorers.1.path") == folder
    with pytest.raises(ModelNotFoundError, match=r"set by scorers\.1\.path"):
        check_model("CLIP model", "x", str(tmp_path / "missing"), "scorers.1.path")
    with pytest.raises(ModelNotFoundError, match=r"HF_HOME.*scorers\.1\.path"):
        check_model("CLIP model", "nobody/not-cached", None, "scorers.1.path")


def test_adapter_widths_from_the_file_header(tiny_ip_adapter_dir):
    from safetensors.torch import load_file

    path = tiny_ip_adapter_dir / SDXL_PLUS_SUBFOLDER / SDXL_PLUS_WEIGHT
    state = load_file(str(path))
    widths = adapter_widths(path)
    assert widths["tokens"] == state["image_proj.norm_out.weight"].shape[0]
    assert widths["attention"] == next(v.shape[1] for k, v in state.items() if k.endswith("to_k_ip.weight"))


def test_mllm_checks(tiny_llava_dir, tmp_path):
    from omegaconf import OmegaConf

    from img_lightning.config.encoders import MLLMConfig

    cfg = OmegaConf.structured(MLLMConfig(backend="llava", model="x", path=str(tiny_llava_dir)))
    problems = Problems()
    hidden = check_mllm(cfg, problems)
    config = json.loads((tiny_llava_dir / "config.json").read_text())
    assert not problems and hidden == config["text_config"]["hidden_size"]
    cfg.backend = "qwen2_5_vl"
    assert check_mllm(cfg, problems) is None and "expects a 'qwen2_5_vl' model" in problems.items[0]
    original = tmp_path / "llava_original"
    original.mkdir()
    (original / "config.json").write_text(json.dumps({"architectures": ["LlavaLlamaForCausalLM"]}))
    (original / "pytorch_model.bin").write_bytes(b"")
    cfg.backend, cfg.path = "llava", str(original)
    problems = Problems()
    assert check_mllm(cfg, problems) is None and "img-convert-llava" in problems.items[0]


def test_scorer_options_are_range_checked_when_the_config_loads(world, prompts, tmp_path, capsys):
    """Issue 19.11: scorers.N.max_new_tokens=0 passed the pre-run checks, generated every image, then
    failed with an internal error."""
    run_dir = tmp_path / "run"
    rc = main(["all", *_args(world, prompts, run_dir, "scorers.5.max_new_tokens=0", "scorers.1.batch_size=0"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "scorers.5.max_new_tokens=0: must be >= 1" in err
    assert "scorers.1.batch_size=0: must be >= 1" in err
    assert "Traceback" not in err and not run_dir.exists()
    # the same from a YAML file
    bad = tmp_path / "bad.yaml"
    bad.write_text("scorers:\n  - kind: clip\n    threshold: 1.5\n  - kind: mllm_grader\n    max_new_tokens: -1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(EvalConfig, [bad], require_complete=False)
    assert "scorers.0.threshold=1.5: must be in [0.0, 1.0]" in str(caught.value)
    assert "scorers.1.max_new_tokens=-1: must be >= 1" in str(caught.value)
