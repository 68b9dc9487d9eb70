"""Non-finite values never pass silently: an aligner that emits NaN stops evaluation with a message."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from img_lightning.aligner import ImplicitAligner
from img_lightning.generation.conditioner import IMGConditioner


class _FakeIP:
    dim = 8

    def encode(self, images):
        return torch.randn(len(images), 4, 8)


class _FakeMLLM:
    def encode(self, images, prompts, template_ids):
        return [torch.randn(5, 16) for _ in images]


def _conditioner(aligner: ImplicitAligner) -> IMGConditioner:
    cfg = SimpleNamespace(mllm=SimpleNamespace(dtype="float32", model="tiny"), ip=SimpleNamespace(kind="x"))
    cond = IMGConditioner(cfg, SimpleNamespace(checkpoint="aligner.safetensors"), device="cpu")
    cond._ip, cond._mllm, cond._aligner = _FakeIP(), _FakeMLLM(), aligner.eval()
    return cond


def test_nan_aligned_tokens_stop_evaluation():
    aligner = ImplicitAligner(16, 8, 1, 2, 4)
    ip, aligned = _conditioner(aligner).align([None, None], ["a", "b"], [0, 1], passes=3)
    assert torch.equal(ip, aligned)  # a fresh aligner is the identity
    with torch.no_grad():
        aligner.zero_linear.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN/Inf tokens"):
        _conditioner(aligner).align([None], ["a"], [0], passes=3)


# -- training ------------------------------------------------------------------------------------
from lightning.pytorch.callbacks import Callback  # noqa: E402

from img_lightning.cache.synthetic import write_synthetic_cache  # noqa: E402
from img_lightning.training import run_training  # noqa: E402
from train_utils import TINY_CACHE_DIMS, tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    dims = TINY_CACHE_DIMS
    manifest = write_synthetic_cache(root / "train", 26, seed=0, **dims)
    write_synthetic_cache(root / "val", 8, seed=1, **dims)
    return root / "train", root / "val", manifest.cache_key


class PoisonBatch(Callback):
    """Puts a NaN into one sample's guidance at the given training step (or into validation)."""

    def __init__(self, step: int | None = None, validation: bool = False) -> None:
        self.step, self.validation = step, validation

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.validation and trainer.global_step == self.step:
            batch["guidance"][0, 0, 0] = float("nan")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.validation:
            batch["guidance"][0, 0, 0] = float("nan")


def test_nan_gradient_stops_the_run_naming_step_and_samples(cache, tmp_path):
    train, _, key = cache
    cfg = tiny_config(train, key, tmp_path, "nan", **{"trainer.max_steps": 8})
    with pytest.raises(FloatingPointError, match=r"optimizer step 3 .*samples s0000-\d{7}"):
        run_training(cfg, [PoisonBatch(step=3)])
    assert not (tmp_path / "nan" / "export").exists()
    last = torch.load(tmp_path / "nan" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3  # the checkpoint before the bad step, never one after it
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_skip_nonfinite_skips_and_counts(cache, tmp_path):
    train, _, key = cache
    cfg = tiny_config(train, key, tmp_path, "skip", **{"trainer.max_steps": 9, "optim.skip_nonfinite": 1})
    result = run_training(cfg, [PoisonBatch(step=3)])
    last = torch.load(tmp_path / "skip" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 9 and int(last["state_dict"]["skipped_steps"]) == 1
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert "aligner.pth" in result.exports


def test_non_finite_validation_is_an_error_not_a_missing_metric(cache, tmp_path):
    train, val, key = cache
    cfg = tiny_config(train, key, tmp_path, "val", **{"trainer.max_steps": 6, "data.val_cache": str(val)})
    with pytest.raises(FloatingPointError, match="val/base"):
        run_training(cfg, [PoisonBatch(validation=True)])


def test_constant_images_are_flagged_in_metadata_and_report(tmp_path):
    from PIL import Image

    from img_lightning.eval_run import PromptRecord
    from img_lightning.eval_run.store import ImageStore, constant_images
    from img_lightning.evaluation.report import ReportInputs, write_report

    store = ImageStore(tmp_path, "img_r1")
    store.save("black", Image.new("RGB", (8, 8)), {})
    noisy = Image.new("RGB", (8, 8))
    noisy.putpixel((3, 3), (10, 0, 0))
    store.save("ok", noisy, {})
    assert constant_images(ImageStore(tmp_path, "img_r1").done()) == ["black"]
    prompts = [PromptRecord(uid="black", text="a cat"), PromptRecord(uid="ok", text="a dog")]
    warning = "img_r1: 1 of 2 images have every pixel the same value"
    inputs = ReportInputs(prompts=prompts, scores={"img_r1": {}}, images={"img_r1": {}}, warnings=[warning])
    html = write_report(inputs, tmp_path / "report", num_resamples=10)["html"]
    assert warning in html.read_text()
