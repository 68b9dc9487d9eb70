"""Question files (encoders.mllm.questions): validation, stable per-sample choice, cache key."""

import hashlib
import json

import pytest
from omegaconf import OmegaConf

from img_lightning.config.encoders import MLLMConfig
from img_lightning.config.loading import ConfigError, load_config
from img_lightning.config.preprocess import PreprocessConfig
from img_lightning.encoders.questions import (
    QuestionFileError,
    builtin_question_set,
    load_question_file,
    question_set_from_config,
)
from img_lightning.encoders.templates import template_id_for
from img_lightning.recipe import cache_key_of, recipe_of

QUESTIONS = ["What must change so the image shows {prompt}?", "Compare the picture with '{prompt}': what differs?",
             "Edit needed for {prompt}"]


def _write(path, items, raw=None):
    path.write_text(raw if raw is not None else json.dumps(items, ensure_ascii=False))
    return path


def test_question_file_loads_and_chooses_stably(tmp_path):
    path = _write(tmp_path / "q.json", QUESTIONS)
    qs = load_question_file(path)
    assert qs.questions == tuple(QUESTIONS) and qs.name == "q.json"
    assert qs.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    ids = [qs.index_for(f"pair-{i}") for i in range(300)]
    assert set(ids) == {0, 1, 2} and ids == [load_question_file(path).index_for(f"pair-{i}") for i in range(300)]
    expect = int.from_bytes(hashlib.sha256(f"{qs.sha256}:abc".encode()).digest()[:8], "big") % 3
    assert qs.index_for("abc") == expect
    # the prompt goes in as given (the released code's str.replace), braces untouched
    assert qs.question(" a {cat} ", 2) == "Edit needed for  a {cat} "
    # the built-in set keeps its old choice and stripping
    builtin = builtin_question_set("img-v1")
    assert builtin.index_for("abc") == template_id_for("abc") and builtin.question(" x ", 0).count(" x ") == 0


@pytest.mark.parametrize("items,raw,message", [
    (["ok {prompt}", "no placeholder"], None, r"entry 1 \('no placeholder'\) contains \{prompt\} 0 times"),
    (["{prompt} and {prompt}"], None, r"entry 0 .* 2 times"),
    (["fine {prompt}", 7], None, "entry 1 is a int"),
    (["look at <image> for {prompt}"], None, r"entry 0 .*<image>"),
    ({"a": "{prompt}"}, None, "non-empty JSON list"),
    ([], None, "non-empty JSON list"),
    (None, "[\"{prompt}\",", "not UTF-8 JSON"),
])
def test_bad_question_files_name_the_entry(tmp_path, items, raw, message):
    path = _write(tmp_path / "bad.json", items, raw)
    with pytest.raises(QuestionFileError, match=message) as err:
        load_question_file(path)
    assert str(path) in str(err.value)
    with pytest.raises(QuestionFileError, match="does not exist"):
        load_question_file(tmp_path / "missing.json")


def test_question_file_sha_joins_the_cache_key(tmp_path):
    a = _write(tmp_path / "a.json", QUESTIONS)
    b = _write(tmp_path / "b.json", QUESTIONS[:2])
    moved = _write(tmp_path / "moved.json", QUESTIONS)

    def key(*extra):
        return cache_key_of(load_config(PreprocessConfig, ["configs/preprocess/demo.yaml"],
                                        ["data.input=x", "data.output=y", *extra]))

    builtin = key()
    with_a = key(f"encoders.mllm.questions={a}")
    assert with_a != builtin and with_a != key(f"encoders.mllm.questions={b}")
    assert with_a == key(f"encoders.mllm.questions={moved}")  # the content, not the path
    cfg = load_config(PreprocessConfig, ["configs/preprocess/demo.yaml"],
                      ["data.input=x", "data.output=y", f"encoders.mllm.questions={a}"])
    mllm = recipe_of(cfg)["encoders"]["mllm"]
    assert mllm["questions_sha256"] == load_question_file(a).sha256 and mllm["templates"] is None
    assert mllm["prompt_format"] == "llava_v0"


def test_unset_question_file_in_a_recipe_is_one_clear_error(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("encoders:\n  mllm:\n    questions: ???\n")
    cfg = load_config(PreprocessConfig, [recipe], require_complete=False)
    with pytest.raises(ConfigError, match="encoders.mllm.questions is not set"):
        cache_key_of(cfg)
    with pytest.raises(ConfigError, match="encoders.mllm.questions is not set"):
        question_set_from_config(cfg.encoders.mllm)


def test_evaluation_chooses_the_same_question_as_preprocessing(tmp_path):
    from img_lightning.generation.conditioner import IMGConditioner

    path = _write(tmp_path / "q.json", QUESTIONS)
    mllm = OmegaConf.structured(MLLMConfig(questions=str(path)))
    cond = IMGConditioner(OmegaConf.create({"mllm": mllm}), aligner_cfg=None, device="cpu")
    qs = question_set_from_config(mllm)
    assert [cond.template_id(f"k{i}") for i in range(50)] == [qs.index_for(f"k{i}") for i in range(50)]
    with pytest.raises(ConfigError, match="not a built-in question set"):
        question_set_from_config(OmegaConf.structured(MLLMConfig(templates="img-v9")))


def test_training_names_the_question_file_of_its_recipe(tmp_path):
    """img-train computes the cache key of its recipe, question file included (data.recipe_overrides)."""
    from img_lightning.config.train import TrainConfig
    from img_lightning.training import expected_cache_key

    path = _write(tmp_path / "edit_instructions.json", QUESTIONS)
    recipe = "configs/preprocess/sdxl_llava13b.yaml"
    train = load_config(TrainConfig, ["configs/train/sdxl_llava13b.yaml"],
                        ["data.cache=/x", f"data.recipe_overrides=[encoders.mllm.questions={path}]"])
    assert train.data.recipe == recipe and train.data.batch_size * int(train.trainer.devices) == 8
    pre = load_config(PreprocessConfig, [recipe], [f"encoders.mllm.questions={path}"], require_complete=False)
    assert expected_cache_key(train.data) == cache_key_of(pre)
    bare = load_config(TrainConfig, ["configs/train/sdxl_llava13b.yaml"], ["data.cache=/x"])
    with pytest.raises(ConfigError, match="data.recipe_overrides"):
        expected_cache_key(bare.data)
