"""The LightningModule records its hyper-parameters, so Lightning's own tools work on our runs."""

from __future__ import annotations

import pytest
import torch
import yaml

from img_lightning.aligner import ImplicitAligner
from img_lightning.cache.synthetic import write_synthetic_cache
from img_lightning.module import AlignerModule
from img_lightning.training import run_training
from train_utils import tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hp")
    m = write_synthetic_cache(root / "cache", 20, guidance_dim=16, ip_tokens=4, ip_dim=8, min_tokens=3,
                              max_tokens=9, shard_size=8)
    start = ImplicitAligner(16, 8, 1, 2, 4)
    torch.nn.init.normal_(start.zero_linear.weight, std=0.1)
    start.save_safetensors(root / "start.safetensors")
    cfg = tiny_config(root / "cache", m.cache_key, root, "run", **{
        "trainer.max_steps": 3, "model.init_from": str(root / "start.safetensors"), "reference.init": "copy",
        "reference.patience": 100})
    run_training(cfg)
    return root / "run", start


def test_hparams_yaml_and_load_from_checkpoint(run):
    run_dir, _ = run
    hparams = yaml.safe_load((run_dir / "tensorboard" / "hparams.yaml").read_text())
    assert hparams["model"]["dim"] == 8 and hparams["model"]["heads"] == 2
    assert hparams["objective"]["reduction"] == "mean" and hparams["optim"]["lr"] == pytest.approx(3e-3)
    module = AlignerModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")  # weights_only loading
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    for name, value in module.state_dict().items():
        torch.testing.assert_close(value, ckpt["state_dict"][name], msg=name)
    assert module.aligner.dims == {"guidance_dim": 16, "dim": 8, "depth": 1, "heads": 2, "dim_head": 4, "ff_mult": 4}


def test_init_from_starts_both_models_then_trains(run):
    run_dir, start = run
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    # f_ref is a copy of the start (no swap with patience 100); f_theta started there and moved.
    for name, value in start.state_dict().items():
        torch.testing.assert_close(first[f"reference.{name}"], value, msg=name)
    assert not torch.equal(first["aligner.zero_linear.weight"], start.zero_linear.weight)


def test_our_step_metrics_land_on_lightnings_logging_steps(tmp_path):
    """Every per-step series (module, reference swap, throughput) is written at exactly the steps
    where Lightning's own LearningRateMonitor writes, with gradient accumulation too."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m = write_synthetic_cache(tmp_path / "cache", 40, guidance_dim=16, ip_tokens=4, ip_dim=8, min_tokens=3,
                              max_tokens=9, shard_size=8)
    cfg = tiny_config(tmp_path / "cache", m.cache_key, tmp_path, "log", **{
        "trainer.max_steps": 7, "trainer.log_every_n_steps": 3, "trainer.accumulate_grad_batches": 2,
        "data.batch_size": 2})
    run_training(cfg)
    events = EventAccumulator(str(tmp_path / "log" / "tensorboard")).Reload()
    # (LearningRateMonitor writes once per micro-batch of a logging step: compare the steps as sets)
    steps = {tag: sorted({e.step for e in events.Scalars(tag)})
             for tag in ("lr-AdamW", "train/loss", "reference/streak", "perf/samples_per_s")}
    assert steps["lr-AdamW"], steps
    assert all(s == steps["lr-AdamW"] for s in steps.values()), steps
