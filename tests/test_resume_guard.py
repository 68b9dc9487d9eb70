"""Resuming a run: a changed config is refused (or allowed explicitly and recorded), the original
config.yaml is never overwritten, and the reference-swap log never lists a swap twice."""

from __future__ import annotations

import json

import pytest
import yaml

from img_lightning.cache.synthetic import write_synthetic_cache
from img_lightning.cli.train import main as train_main
from img_lightning.config.changes import config_changes, flatten
from img_lightning.config.loading import ConfigError
from img_lightning.training import run_training
from train_utils import TINY_CACHE_DIMS, CrashAt, tiny_config, tiny_overrides


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    dims = TINY_CACHE_DIMS
    a = write_synthetic_cache(root / "a", 26, seed=0, **dims)
    write_synthetic_cache(root / "b", 26, seed=5, **dims)
    return root / "a", root / "b", a.cache_key


def _interrupted_run(tmp_path, cache, key, name="run", **extra):
    """6 steps with checkpoints every 3, killed at step 5: resumable from step 3."""
    cfg = tiny_config(cache, key, tmp_path, name, **{"trainer.max_steps": 8, **extra})
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run_training(cfg, [CrashAt(5)])
    return tmp_path / name


def test_flatten_and_changes():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": {}}) == {"a.b": 1, "a.c": [1, 2], "d": {}}
    assert config_changes({"a": {"b": 1}}, {"a": {"b": 2, "c": 3}}) == {"a.b": (1, 2), "a.c": (None, 3)}


@pytest.mark.parametrize(
    "change",
    [{"optim.lr": 0.01}, {"data.batch_size": 2}, {"objective.beta": 2.0}, {"reference.patience": 3}],
)
def test_resume_with_changed_optimisation_or_data_is_refused(caches, tmp_path, change):
    cache, _, key = caches
    run_dir = _interrupted_run(tmp_path, cache, key)
    saved = (run_dir / "config.yaml").read_text()
    cfg = tiny_config(cache, key, tmp_path, "run", **{"trainer.max_steps": 8, "run.ckpt_path": "last", **change})
    with pytest.raises(ConfigError) as err:
        run_training(cfg)
    (changed_key,) = change
    assert changed_key in str(err.value) and "run.allow_config_change" in str(err.value)
    assert (run_dir / "config.yaml").read_text() == saved
    assert not (run_dir / "resumes").exists()


def test_resume_with_another_cache_is_refused_by_the_cli(caches, tmp_path, capsys):
    cache, other, key = caches
    _interrupted_run(tmp_path, cache, key)
    argv = tiny_overrides(other, key, tmp_path, "run", **{"trainer.max_steps": 8, "run.ckpt_path": "last"})
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert "data.cache" in err and "Traceback" not in err


def test_allowed_change_is_recorded_and_the_original_config_kept(caches, tmp_path):
    cache, _, key = caches
    run_dir = _interrupted_run(tmp_path, cache, key)
    original = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg = tiny_config(cache, key, tmp_path, "run", **{
        "trainer.max_steps": 8, "run.ckpt_path": "last", "optim.lr": 0.01,
        "data.num_workers": 1,  # a free key: no permission needed
        "run.allow_config_change": "[optim.lr]",
    })
    run_training(cfg)
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == original
    resumed = yaml.safe_load((run_dir / "resumes" / "001" / "config.yaml").read_text())
    assert resumed["optim"]["lr"] == 0.01 and original["optim"]["lr"] != 0.01
    info = json.loads((run_dir / "resumes" / "001" / "run_info.json").read_text())
    assert info["config_changes"]["optim.lr"] == [original["optim"]["lr"], 0.01]
    assert "data.num_workers" in info["config_changes"]


def test_allow_list_with_unknown_key_is_refused(caches, tmp_path):
    cache, _, key = caches
    _interrupted_run(tmp_path, cache, key)
    cfg = tiny_config(cache, key, tmp_path, "run", **{
        "trainer.max_steps": 8, "run.ckpt_path": "last", "run.allow_config_change": "[optim.lrr]"})
    with pytest.raises(ConfigError, match="optim.lrr"):
        run_training(cfg)


def test_max_steps_may_grow_unless_the_schedule_depends_on_it(caches, tmp_path):
    cache, _, key = caches
    _interrupted_run(tmp_path, cache, key, name="constant")
    run_training(tiny_config(cache, key, tmp_path, "constant", **{"trainer.max_steps": 9, "run.ckpt_path": "last"}))

    _interrupted_run(tmp_path, cache, key, name="cosine", **{"optim.schedule": "cosine"})
    cfg = tiny_config(cache, key, tmp_path, "cosine",
                      **{"trainer.max_steps": 9, "run.ckpt_path": "last", "optim.schedule": "cosine"})
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        run_training(cfg)


def test_swap_log_has_no_duplicate_after_resume(caches, tmp_path):
    cache, _, key = caches
    extra = {"trainer.max_steps": 12, "reference.patience": 1, "reference.init": "copy"}
    straight = tiny_config(cache, key, tmp_path, "straight", **extra)
    run_training(straight)
    cfg = tiny_config(cache, key, tmp_path, "killed", **extra)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run_training(cfg, [CrashAt(5)])
    log = tmp_path / "killed" / "reference_swaps" / "rank0.jsonl"
    before = log.read_text().splitlines()
    run_training(tiny_config(cache, key, tmp_path, "killed", **{**extra, "run.ckpt_path": "last"}))

    expected = (tmp_path / "straight" / "reference_swaps" / "rank0.jsonl").read_text().splitlines()
    got = log.read_text().splitlines()
    assert len(expected) >= 2
    # The kill came after swaps the checkpoint (step 3) had not seen: they were logged, then replayed.
    assert len(before) > sum(json.loads(line)["step"] <= 3 for line in expected)
    assert [json.loads(line)["swap"] for line in got] == list(range(1, len(got) + 1))
    assert got == expected


def test_resume_with_another_world_size_is_refused(caches, tmp_path):
    """devices: auto on a machine with another GPU count would silently change the global batch."""
    cache, _, key = caches
    run_dir = _interrupted_run(tmp_path, cache, key)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    import torch

    state = torch.load(ckpt, weights_only=True)
    assert state["FeatureCacheDataModule"]["world_size"] == 1
    state["FeatureCacheDataModule"]["world_size"] = 2  # as if it had been counted on two ranks
    torch.save(state, ckpt)
    with pytest.raises(Exception, match="world_size is 1, the checkpoint.s run had 2"):
        run_training(tiny_config(cache, key, tmp_path, "run", **{"trainer.max_steps": 8, "run.ckpt_path": "last"}))
