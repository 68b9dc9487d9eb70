"""Every YAML shipped under configs/ loads with its schema and builds what it describes, so a config
can never rot unnoticed. Data-driven over the directory: a new file is covered by the loader of its
folder; a new folder fails until it is given a loader here (or listed in ``NOT_COVERED``).

Up to the point of needing weights: preprocess recipes compute their cache key and pass
preprocessing's value checks; train configs build the ``AlignerModule`` (full-size ones on the
``meta`` device, no memory allocated) and the key of the recipe they name; eval configs resolve
every backbone x benchmark (recipe merged) and run every check of ``img-eval``'s preflight that is
about the config, with "is the model/file there?" answered yes; rubrics load.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from img_lightning.config.eval import EvalConfig
from img_lightning.config.loading import load_config, missing_keys
from img_lightning.config.preprocess import PreprocessConfig
from img_lightning.config.train import TrainConfig
from img_lightning.models import ModelNotFoundError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Folders whose configs another test covers; anything else unknown fails test_every_folder_has_a_loader.
NOT_COVERED: dict[str, str] = {}
COVERED = ("preprocess", "train", "eval/backbones", "eval/benchmarks", "eval/rubrics", "eval", "finetune_mllm",
           "pipeline")


def yamls(folder: str) -> list[Path]:
    return sorted((CONFIGS / folder).glob("*.yaml"))


def _ids(paths):
    return [str(p.relative_to(CONFIGS)) for p in paths]


@pytest.fixture(scope="module")
def question_file(tmp_path_factory):
    """A question file of our own for the recipes that leave ``encoders.mllm.questions`` to the user."""
    path = tmp_path_factory.mktemp("questions") / "questions.json"
    path.write_text(json.dumps(["How should the image change to show {prompt}?", "What is wrong with {prompt}?"]))
    return path


def test_every_folder_has_a_loader():
    folders = {str(p.parent.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")}
    unknown = folders - set(COVERED) - {f for f in folders for skip in NOT_COVERED if f.split("/")[0] == skip}
    assert not unknown, (f"configs/ folders no test loads: {sorted(unknown)}; "
                         f"add a loader to tests/test_shipped_configs.py")
    assert all(yamls(f) for f in ("preprocess", "train", "eval/backbones", "eval/benchmarks", "eval/rubrics"))


# ---------------------------------------------------------------------------------- preprocess
def _recipe(path, question_file):
    from omegaconf import OmegaConf

    cfg = load_config(PreprocessConfig, [path], require_complete=False)
    if OmegaConf.is_missing(cfg.encoders.mllm, "questions"):
        cfg.encoders.mllm.questions = str(question_file)
    return cfg


def test_preprocess_recipes_validate_and_have_distinct_keys(question_file):
    from img_lightning.recipe import cache_key_of
    from preprocessing.run import validate_config

    keys = {}
    for path in yamls("preprocess"):
        cfg = _recipe(path, question_file)
        assert set(missing_keys(cfg)) <= {"data.input", "data.output", "encoders.mllm.path"}, path.name
        validate_config(cfg)
        keys[path.stem] = cache_key_of(cfg)
    assert len(set(keys.values())) == len(keys), keys  # every recipe is a different cache


# ---------------------------------------------------------------------------------- train
@pytest.mark.parametrize("path", yamls("train"), ids=_ids(yamls("train")))
def test_train_config_builds_its_module_and_names_a_shipped_recipe(path, question_file):
    from img_lightning.training import build_module, expected_cache_key

    cfg = load_config(TrainConfig, [path], require_complete=False)
    assert missing_keys(cfg) == ["data.cache"], path.name  # the only thing left to the user
    recipe = CONFIGS / Path(cfg.data.recipe).relative_to("configs")
    assert recipe.is_file() and recipe.parent.name == "preprocess"
    cfg.data.recipe_overrides = [f"encoders.mllm.questions={question_file}"]
    assert len(expected_cache_key(cfg.data)) == 16
    small = cfg.model.dim * cfg.model.guidance_dim <= 1 << 16
    with torch.device("cpu" if small else "meta"):  # full size: shapes only, nothing allocated
        module = build_module(cfg)
    dims = module.aligner.dims
    assert (dims["dim"], dims["guidance_dim"], dims["heads"] * dims["dim_head"]) == (
        cfg.model.dim, cfg.model.guidance_dim, cfg.model.heads * cfg.model.dim_head)
    assert module.reference.dims == dims and not any(p.requires_grad for p in module.reference.parameters())


# ---------------------------------------------------------------------------------- eval
@pytest.fixture
def models_are_there(monkeypatch, tmp_path):
    """Every "is the model/file there?" check answers yes, so only the config itself is checked."""
    import img_lightning.generation.requirements  # noqa: F401 - imported before the patch: it keeps the real checks
    from img_lightning.encoders import checks as enc_checks
    from img_lightning.evaluation.scorers import aesthetic, blip_vqa, clip, hps, image_reward, spatial

    for module in (aesthetic, blip_vqa, clip, image_reward, spatial):
        monkeypatch.setattr(module, "check_model", lambda *a, **k: tmp_path)
    def file_is_there(path, what, key, where=""):
        if not path:  # not set at all is still a config problem
            raise ModelNotFoundError(f"{key}: not set")
        return Path(path)

    for module in (aesthetic, hps, image_reward):
        monkeypatch.setattr(module, "need_file", file_is_there)
    monkeypatch.setattr(enc_checks, "check_mllm", lambda *a, **k: None)  # the grader's MLLM (imported when called)


def _fill_missing(cfg, tmp_path):
    """A value for every ``???``: the released HPS file name (the version is read from it), a T2I-CompBench-
    style dataset folder of our own (complex subtypes), placeholder paths elsewhere."""
    from omegaconf import OmegaConf

    dataset = tmp_path / "dataset"
    dataset.mkdir(exist_ok=True)
    for name in ("complex_val_spatial.txt", "complex_val_action.txt"):
        (dataset / name).write_text("a cat on the left of a dog\n")
    for key in missing_keys(cfg):
        scorer_checkpoint = key.startswith("scorers.") and key.endswith(".checkpoint")
        if scorer_checkpoint and cfg.scorers[int(key.split(".")[1])].kind == "hps":
            value = str(tmp_path / "HPS_v2.1_compressed.pt")
        elif key in ("prompts.path",) or key.endswith("subset_dir"):
            value = str(dataset)
        else:
            value = str(tmp_path / key.replace(".", "_"))
        OmegaConf.update(cfg, key, value, merge=False)
    assert not missing_keys(cfg)


def _check_config(cfg):
    """The preflight's config-level checks: generation settings, the encoders block (preprocessing's
    value checks, as the recipe it came from), every scorer's options."""
    from img_lightning.config.eval import PipelineKind
    from img_lightning.errors import Problems
    from img_lightning.evaluation.scorers import check_scorers
    from img_lightning.generation.requirements import check_generation_config
    from preprocessing.run import validate_config

    check_generation_config(cfg)
    assert isinstance(cfg.generation.pipeline.kind, PipelineKind)
    as_recipe = load_config(PreprocessConfig, [], require_complete=False)
    as_recipe.encoders = cfg.encoders
    validate_config(as_recipe)
    problems = Problems()
    check_scorers(cfg.scorers, problems)
    assert not problems, problems.items


BENCHMARKS = yamls("eval/benchmarks")


@pytest.mark.parametrize("bench", BENCHMARKS, ids=_ids(BENCHMARKS))
def test_every_backbone_with_every_benchmark(bench, models_are_there, tmp_path):
    from img_lightning.evaluation.pipeline import resolve_config

    for backbone in yamls("eval/backbones"):
        cfg = resolve_config([str(backbone), str(bench), f"run_dir={tmp_path / 'run'}"], allow_missing=True)
        assert cfg.recipe_applied and cfg.scorers, (backbone.name, bench.name)  # the recipe's encoders
        _fill_missing(cfg, tmp_path)
        _check_config(cfg)


def test_demo_eval_config(models_are_there, tmp_path):
    """configs/eval/demo.yaml (the only top-level eval config; img-demo fills its paths and registers
    the tiny HPS architecture, see img_lightning/tiny/demo_eval.py, and test_eval_preflight.py runs
    it for real on the tiny models)."""
    from img_lightning.evaluation.pipeline import resolve_config

    assert [p.name for p in yamls("eval")] == ["demo.yaml", "real_width.yaml"], \
        "a new top-level eval config needs a test here"
    cfg = resolve_config([str(CONFIGS / "eval" / "demo.yaml"), "recipe=configs/preprocess/demo.yaml"],
                         allow_missing=True)
    _fill_missing(cfg, tmp_path)
    assert cfg.scorers[0].kind == "hps"
    # the demo gives the tiny HPS architecture's JSON and checkpoint on its command line
    cfg.scorers[0].model, cfg.scorers[0].checkpoint = "ViT-H-14", str(tmp_path / "hps_tiny.pt")
    _check_config(cfg)


def test_real_width_eval_config(models_are_there, tmp_path):
    """configs/eval/real_width.yaml (img-demo --real-width fills its paths; the slow test runs it):
    its encoders come from the real-width recipe, and it reads the aligner the real-width train config makes."""
    from img_lightning.evaluation.pipeline import resolve_config

    cfg = resolve_config([str(CONFIGS / "eval" / "real_width.yaml"), "recipe=configs/preprocess/real_width.yaml"],
                         allow_missing=True)
    _fill_missing(cfg, tmp_path)
    assert cfg.encoders.mllm.model == "img-lightning/real-width-llava"
    _check_config(cfg)
    train = load_config(TrainConfig, [CONFIGS / "train" / "real_width.yaml"], require_complete=False)
    assert Path(train.data.recipe) == Path("configs/preprocess/real_width.yaml")
    assert (train.model.guidance_dim, train.model.dim, train.model.depth, train.model.heads, train.model.dim_head) == \
        (5120, 2048, 4, 20, 64)  # the paper's SDXL aligner


@pytest.mark.parametrize("backbone", yamls("eval/backbones"), ids=_ids(yamls("eval/backbones")))
def test_backbone_aligner_settings_match_the_train_config_of_its_recipe(backbone):
    """The eval backbone reads aligners that a shipped train config makes from the same recipe."""
    cfg = load_config(EvalConfig, [backbone], require_complete=False)
    trains = [load_config(TrainConfig, [p], require_complete=False) for p in yamls("train")]
    same = [t for t in trains if Path(t.data.recipe) == Path(cfg.recipe)]
    assert same, f"no train config uses {cfg.recipe}"
    for t in same:
        assert t.model.passes == cfg.img.aligner.passes
        assert cfg.img.aligner.dim_head in (None, t.model.dim_head)


@pytest.mark.parametrize("path", yamls("eval/rubrics"), ids=_ids(yamls("eval/rubrics")))
def test_rubrics_load(path):
    from img_lightning.evaluation.scorers.rubric import load_rubric

    rubric = load_rubric(path)
    assert rubric.aspects and "{prompt}" in rubric.template


# ---------------------------------------------------------------------------------- finetune_mllm
@pytest.mark.parametrize("path", yamls("finetune_mllm"), ids=_ids(yamls("finetune_mllm")))
def test_finetune_configs_load_and_build_their_strategy(path, tiny_llava_dir, tiny_qwen_dir):
    """The schema and value checks pass and the Lightning strategy (FSDP wrap/checkpoint policies
    from the model classes, or DDP) builds. The model's classes are read from a tiny model of the
    same architecture (the real weights are not here); no weights are loaded."""
    from img_lightning.config.finetune_mllm import FinetuneMLLMConfig
    from img_lightning.finetune.strategy import build_strategy

    cfg = load_config(FinetuneMLLMConfig, [path], require_complete=False)
    cfg.mllm.path = str(tiny_qwen_dir if str(getattr(cfg.mllm.backend, "value", cfg.mllm.backend)) == "qwen2_5_vl"
                        else tiny_llava_dir)
    strategy = build_strategy(cfg)
    kind = str(getattr(cfg.trainer.strategy, "value", cfg.trainer.strategy))
    assert (strategy == "auto") == (kind not in ("fsdp", "ddp"))


# ---------------------------------------------------------------------------------- pipeline
@pytest.mark.parametrize("path", yamls("pipeline"), ids=_ids(yamls("pipeline")))
def test_pipeline_recipes_name_stage_configs_that_belong_together(path, tmp_path):
    """Every stage config an img-submit recipe names loads with its schema, and training reads the
    recipe's own preprocessing (no SDXL aligner on a FLUX cache)."""
    from img_lightning.config.finetune_mllm import FinetuneMLLMConfig
    from img_lightning.config.pipeline import PipelineConfig
    from img_lightning.submit.plan import plan_pipeline

    cfg = load_config(PipelineConfig, [path], require_complete=False)
    load_config(FinetuneMLLMConfig, [cfg.mllm.config], require_complete=False)
    load_config(PreprocessConfig, [cfg.preprocess.config], require_complete=False)
    train = load_config(TrainConfig, [cfg.train.config], require_complete=False)
    assert train.data.recipe == cfg.preprocess.config
    if cfg.eval.enabled:
        load_config(EvalConfig, list(cfg.eval.configs), require_complete=False)
    cfg.root, cfg.mllm.data, cfg.mllm.convert_from, cfg.preprocess.input = str(tmp_path), "/d", "/c", "/i"
    stages = plan_pipeline(cfg, CONFIGS.parent / "slurm")
    assert [s.name for s in stages] == ["mllm", "preprocess", "train", "eval"][: len(stages)]
