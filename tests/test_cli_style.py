"""One command-line shape for every CLI, and a misspelled key that names the nearest valid one.

Shape: ``COMMAND [STAGE] ARGS...`` with the common switches (``-v -q --no-progress --debug``)
anywhere after ``COMMAND``, before the stage too, and options free to stand between config files
and overrides. Before, ``img-train a.yaml -q x=1`` was refused, ``img-finetune-mllm -q train ...``
silently dropped ``-q``, and ``img-preprocess -q verify DIR`` read ``verify`` as a config file.
"""

from __future__ import annotations

import pytest

from img_lightning.cli import convert_llava, finetune_mllm, generate, submit, train
from img_lightning.cli import eval as eval_cli
from img_lightning.cli.common import show_progress
from img_lightning.config.eval import EvalConfig
from img_lightning.config.loading import ConfigError, dotted_keys, load_config, suggest_key
from img_lightning.config.train import TrainConfig
from preprocessing import cli as preprocess_cli
from preprocessing import demo

PARSERS = {"img-train": train.parse_args, "img-eval": eval_cli.parse_args, "img-preprocess": preprocess_cli.parse_args,
           "img-finetune-mllm": finetune_mllm.parse_args, "img-convert-llava": convert_llava.parse_args,
           "img-generate": generate.parse_args, "img-submit": submit.parse_args,
           "img-demo": lambda argv: demo.parse_command(demo._parser(), argv)}


@pytest.mark.parametrize("prog, argv, expect", [
    ("img-train", ["a.yaml", "-q", "x=1"], {"config": ["a.yaml", "x=1"], "quiet": True}),
    ("img-train", ["--no-progress", "a.yaml", "--print-config", "x=1"],
     {"config": ["a.yaml", "x=1"], "no_progress": True, "print_config": True}),
    ("img-eval", ["-q", "all", "a.yaml", "--task-index", "1", "x=1", "--num-tasks", "2"],
     {"stage": "all", "config": ["a.yaml", "x=1"], "quiet": True, "task_index": 1, "num_tasks": 2}),
    ("img-eval", ["report", "a.yaml", "--no-progress", "b.yaml"],
     {"stage": "report", "config": ["a.yaml", "b.yaml"], "no_progress": True}),
    ("img-finetune-mllm", ["-q", "train", "a.yaml", "x=1"], {"command": "train", "config": ["a.yaml", "x=1"],
                                                           "quiet": True}),
    ("img-finetune-mllm", ["--debug", "--no-progress", "eval", "a.yaml", "-v", "x=1"],
     {"command": "eval", "config": ["a.yaml", "x=1"], "debug": True, "no_progress": True, "verbose": True}),
    ("img-finetune-mllm", ["export", "a.yaml", "--checkpoint", "c.ckpt", "x=1", "--out", "o"],
     {"command": "export", "config": ["a.yaml", "x=1"], "checkpoint": "c.ckpt", "out": "o"}),
    ("img-preprocess", ["-q", "verify", "/c", "--workers", "2"], {"command": "verify", "dir": "/c", "quiet": True,
                                                                 "workers": 2}),
    ("img-preprocess", ["-q", "a.yaml", "--task-index", "0", "x=1"],
     {"command": "run", "config": ["a.yaml", "x=1"], "quiet": True, "task_index": 0}),
    ("img-preprocess", ["--no-progress", "run", "a.yaml"], {"command": "run", "config": ["a.yaml"],
                                                            "no_progress": True}),
    ("img-preprocess", ["manifest", "--debug", "/c"], {"command": "manifest", "dir": "/c", "debug": True}),
    ("img-convert-llava", ["-q", "src", "--dtype", "bfloat16", "dst"], {"src": "src", "dst": "dst", "quiet": True,
                                                                         "dtype": "bfloat16"}),
    ("img-demo", ["--no-progress", "--out", "o"], {"no_progress": True}),
    ("img-generate", ["a.yaml", "--prompt", "p", "x=1", "-q", "--out", "o"],
     {"config": ["a.yaml", "x=1"], "prompt": ["p"], "quiet": True}),
    ("img-submit", ["a.yaml", "--dry-run", "root=/x"], {"config": ["a.yaml", "root=/x"], "dry_run": True}),
])
def test_one_shape_options_anywhere_after_the_command(prog, argv, expect):
    args = PARSERS[prog](argv)
    assert {k: getattr(args, k) for k in expect} == expect


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_every_cli_has_the_same_switches(prog):
    args = PARSERS[prog]({"img-train": ["a.yaml"], "img-eval": ["all", "a.yaml"], "img-preprocess": ["a.yaml"],
                          "img-finetune-mllm": ["train", "a.yaml"], "img-convert-llava": ["s", "d"],
                          "img-generate": ["a.yaml", "--out", "o"], "img-submit": ["a.yaml"],
                          "img-demo": []}[prog])
    assert {k: getattr(args, k) for k in ("verbose", "quiet", "no_progress", "debug")} == dict.fromkeys(
        ("verbose", "quiet", "no_progress", "debug"), False)
    assert show_progress(args)


def test_show_progress_follows_quiet_and_no_progress():
    assert not show_progress(train.parse_args(["a.yaml", "-q"]))
    assert not show_progress(train.parse_args(["a.yaml", "--no-progress"]))


@pytest.mark.parametrize("prog", ["img-finetune-mllm", "img-eval"])
def test_an_unknown_stage_is_refused(prog, capsys):
    with pytest.raises(SystemExit) as exc:
        PARSERS[prog](["trian", "a.yaml"])
    assert exc.value.code == 2 and "trian" in capsys.readouterr().err


def test_no_stage_prints_the_overview_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        finetune_mllm.parse_args([])
    assert exc.value.code == 2 and "{train,export,eval}" in capsys.readouterr().out


# A misspelled key names the nearest valid one.

@pytest.mark.parametrize("override, refused, near", [
    ("data.batchsize=3", "data.batchsize", "data.batch_size"),  # a typo in the name
    ("dta.batch_size=3", "dta", "data"),  # a typo in the section
    ("optim.batch_size=3", "optim.batch_size", "data.batch_size"),  # the right name in the wrong section
    ("trainer.max_step=3", "trainer.max_step", "trainer.max_steps"),
])
def test_a_misspelled_key_suggests_the_nearest(override, refused, near):
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, [], [override], require_complete=False)
    assert f"command line: unknown config key '{refused}': did you mean '{near}'?" in str(err.value)


def test_a_misspelled_key_in_a_yaml_file_names_the_file_and_the_nearest(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("img:\n  aligner:\n    pases: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(EvalConfig, [path], require_complete=False)
    assert str(err.value).startswith(f"{path}: unknown config key 'img.aligner.pases': did you mean "
                                     f"'img.aligner.passes'?")


def test_a_misspelled_key_in_a_list_entry_suggests_from_its_schema():
    with pytest.raises(ConfigError, match="unknown config key 'chekpoint': did you mean 'checkpoint'"):
        load_config(EvalConfig, [], ["scorers=[{kind: hps, chekpoint: x}]"], require_complete=False)


def test_nothing_close_says_so():
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, [], ["data.zzzzqqq=1"], require_complete=False)
    assert "did you mean" not in str(err.value) and "check its spelling" in str(err.value)
    assert suggest_key(load_config(TrainConfig, require_complete=False), "qqq.zzz") is None


def test_dotted_keys_are_the_command_line_spellings():
    keys = dotted_keys(load_config(TrainConfig, require_complete=False))
    assert {"data", "data.batch_size", "optim.lr", "trainer.max_steps"} <= set(keys)
