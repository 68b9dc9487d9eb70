"""The one job assembly (img_lightning/job.py) with a toy third stage: what a new stage gets by plugging
in its DataModule, module and end-of-run work - run directory, lock, checkpoints, exact resume, the
requeue's early return, final validation - and the order in which the assembly calls it."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from img_lightning.config.loading import load_config
from img_lightning.config.train import RESUME_FREE_KEYS, DataConfig, TrainConfig
from img_lightning.data.batch_loader import BatchLoader
from img_lightning.data.plan import PAD, BatchRequest
from img_lightning.data.resumable import ResumableDataModule
from img_lightning.errors import UserError
from img_lightning.job import Job, JobResult, Stage, run_job, standard_callbacks
from img_lightning.run_lock import LOCK_NAME, acquire_run_lock
from train_utils import CrashAt, srun_environment


class NumberLoader(BatchLoader):
    """Sample ``i`` is the pair (x = i / 10, y = 2x); PAD is a sample with no loss."""

    def read_batch(self, request: BatchRequest) -> dict:
        ids = torch.tensor(request.indices, dtype=torch.long)
        x = ids.clamp(min=0).float()[:, None] / 10
        return {"x": x, "y": 2 * x, "real": ids != PAD, "ids": ids}


class NumberData(ResumableDataModule[DataConfig]):
    def setup(self, stage=None) -> None:
        if self.train_ids is None:
            self.train_ids, self.val_ids = np.arange(18), np.arange(18, 23)

    def train_dataloader(self) -> NumberLoader:
        self.train_loader = NumberLoader(self.train_plan(), num_workers=self.cfg.num_workers)
        return self.train_loader

    def val_dataloader(self) -> NumberLoader:
        return NumberLoader(self.eval_plan(self.val_ids, pad=True), num_workers=0)

    def resume_refused(self, problems):
        return UserError("; ".join(problems))


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(1, 1)

    def _loss(self, batch):
        err = (self.layer(batch["x"]) - batch["y"]).pow(2)[:, 0]
        return (err * batch["real"]).sum() / batch["real"].sum().clamp(min=1)

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch), batch_size=int(batch["real"].sum()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@dataclass
class NumberResult(JobResult):
    exported: dict[str, float] = field(default_factory=dict)


class NumberStage(Stage[TrainConfig, NumberData, Regression, NumberResult]):
    command = "number-stage"
    schema = TrainConfig
    result_type = NumberResult

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.run_dir_written_before_inputs: bool | None = None

    def resume_free_keys(self, cfg):
        return RESUME_FREE_KEYS

    def datamodule(self, cfg, run_dir: Path):
        self.calls.append("datamodule")
        self.run_dir_written_before_inputs = (run_dir / "config.yaml").exists()
        return NumberData(cfg.data)

    def module(self, cfg):
        self.calls.append("module")
        return Regression()

    def callbacks(self, cfg, run_dir):
        return standard_callbacks(cfg, run_dir)

    def accumulation(self, cfg, world_size):
        return 2

    def run_info(self, trainer):
        return {"accumulate_grad_batches": trainer.accumulate_grad_batches}

    def after_fit(self, job: Job):
        self.calls.append("after_fit")

    def validates(self, job: Job):
        self.calls.append("validates")
        return True

    def finish(self, job: Job, result: NumberResult):
        self.calls.append("finish")
        assert result.metrics  # after the final validation
        result.exported = {k: float(v) for k, v in job.module.state_dict().items()}


def _cfg(tmp_path, name, **extra):
    values = {"data.cache": "unused", "data.batch_size": 2, "data.num_workers": 2, "trainer.accelerator": "cpu",
              "trainer.devices": 1, "trainer.precision": "32", "trainer.max_steps": 6,
              "trainer.val_check_interval": 100, "trainer.checkpoint_every_n_steps": 2,
              "trainer.enable_progress_bar": False, "run.root": str(tmp_path), "run.name": name, **extra}
    return load_config(TrainConfig, [], [f"{k}={v}" for k, v in values.items()])


class Seen(Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append((int(batch["epoch"]), int(batch["position"]), batch["ids"].tolist()))


def test_a_new_stage_gets_the_whole_job_by_plugging_in_its_parts(tmp_path):
    stage, seen = NumberStage(), Seen()
    result = run_job(_cfg(tmp_path, "run"), stage, [seen])
    assert isinstance(result, NumberResult) and result.requeued_at is None and result.is_global_zero
    assert stage.calls == ["datamodule", "module", "after_fit", "validates", "finish"]
    assert set(result.metrics) == {"val/loss"} and result.exported
    run = tmp_path / "run"
    info = json.loads((run / "run_info.json").read_text())
    assert (info["resumed_from"], info["world_size"], info["accumulate_grad_batches"]) == (None, 1, 2)
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((run / LOCK_NAME).read_text())["command"] == "number-stage"
    acquire_run_lock(run, "next job").release()  # released when the job returned
    assert stage.run_dir_written_before_inputs is False
    # 6 optimizer steps of 2 accumulated batches; epoch 0 has 9 batches and its last one is a step alone
    assert len(seen.batches) == 11
    assert [b[:2] for b in seen.batches[8:10]] == [(0, 8), (1, 0)]


def test_a_killed_job_of_a_new_stage_resumes_exactly(tmp_path):
    straight = Seen()
    run_job(_cfg(tmp_path, "straight"), NumberStage(), [straight])
    first, rest = Seen(), Seen()
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run_job(_cfg(tmp_path, "killed"), NumberStage(), [first, CrashAt(3)])
    resumed = run_job(_cfg(tmp_path, "killed", **{"run.ckpt_path": "last"}), NumberStage(), [rest])
    assert first.batches[:4] + rest.batches == straight.batches  # from the step-2 checkpoint on
    resume_info = json.loads((tmp_path / "killed" / "resumes" / "001" / "run_info.json").read_text())
    assert resume_info["resumed_from"].endswith("last.ckpt")
    state = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for k, v in state.items():
        torch.testing.assert_close(torch.tensor(resumed.exported[k]), v.squeeze(), atol=1e-6, rtol=0)


class SignalAfterStep(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_a_requeued_job_returns_before_the_stages_end_of_run_work(monkeypatch, tmp_path):
    scontrol = srun_environment(monkeypatch, tmp_path, "number-stage", "77")
    stage = NumberStage()
    result = run_job(_cfg(tmp_path, "requeued"), stage, [SignalAfterStep(2)])
    assert result.requeued_at is not None and not result.metrics and not result.exported
    assert stage.calls == ["datamodule", "module"]  # no after_fit, validation or finish
    assert scontrol.read_text().split() == ["requeue", "77"]
