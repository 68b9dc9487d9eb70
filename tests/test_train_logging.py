"""What a researcher watches during and after a run: the progress bar in steps of the run, and in
TensorBoard the gradient norm before clipping and the hyper-parameters with the final metrics, all
in one event file."""

from __future__ import annotations

import re

import pytest
import torch

from img_lightning.cache.synthetic import write_synthetic_cache
from img_lightning.training import run_training
from train_utils import TINY_CACHE_DIMS, tiny_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("logging")
    train = write_synthetic_cache(root / "train", 24, seed=1, **TINY_CACHE_DIMS)
    write_synthetic_cache(root / "val", 8, seed=2, **TINY_CACHE_DIMS)
    return root, train.cache_key


def test_the_progress_bar_counts_the_runs_steps(cache, tmp_path, capfd):
    root, key = cache
    # 24 pairs in batches of 4: 6 steps an epoch, so 14 steps take 3 epochs (max_epochs -1)
    cfg = tiny_config(root / "train", key, tmp_path, "bar", **{"trainer.enable_progress_bar": True,
                                                                "trainer.max_steps": 14})
    assert cfg.trainer.max_epochs == -1
    run_training(cfg)
    err = capfd.readouterr().out  # Lightning's tqdm bars write to stdout
    assert "steps" in err and re.search(r"\b14/14\b", err), err[-2000:]
    assert not re.search(r"Epoch \d+/-", err) and "/-2" not in err
    assert re.search(r"epoch=2\b", err)  # the epoch is beside the steps


def test_tensorboard_has_the_gradient_norm_before_clipping_and_the_final_hparams(cache, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    root, key = cache
    cfg = tiny_config(root / "train", key, tmp_path, "tb", **{"data.val_cache": str(root / "val"),
                                                               "optim.grad_clip": 1e-4, "trainer.max_steps": 6})
    result = run_training(cfg)
    files = sorted((tmp_path / "tb" / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(files) == 1, files  # one event file per run, hparams included
    events = EventAccumulator(str(files[0].parent)).Reload()
    norms = [e.value for e in events.Scalars("train/grad_norm")]
    steps = [e.step for e in events.Scalars("train/grad_norm")]
    assert len(steps) == 3 and steps == sorted({e.step for e in events.Scalars("lr-AdamW")})  # logging steps only
    # clipped to 1e-4 before the step: a norm above the clip value was measured before clipping
    assert all(n > 1e-3 for n in norms), norms
    content = events.PluginTagToContent("hparams")
    start = next(plugin_data_pb2.HParamsPluginData.FromString(v).session_start_info for k, v in content.items()
                 if k.endswith("session_start_info"))
    assert start.hparams["optim.lr"].number_value == pytest.approx(3e-3)
    assert start.hparams["data.cache"].string_value == str(root / "train")
    experiment = next(plugin_data_pb2.HParamsPluginData.FromString(v).experiment for k, v in content.items()
                      if k.endswith("experiment"))
    assert {m.name.tag for m in experiment.metric_infos} >= {"final/val/base", "final/val/identity"}
    final = events.Scalars("final/val/base")
    assert [e.step for e in final] == [6] and final[0].value == pytest.approx(result.metrics["val/base"])


def test_the_gradient_norm_is_the_global_2_norm():
    from types import SimpleNamespace

    from img_lightning.callbacks.tensorboard import gradient_norm

    layer = torch.nn.Linear(3, 2)
    layer.weight.grad = torch.full((2, 3), 2.0)
    layer.bias.grad = None
    layer.device = torch.device("cpu")
    assert gradient_norm(layer, SimpleNamespace(strategy=object())).item() == pytest.approx((6 * 4.0) ** 0.5)
