"""The finetune on bad data, misuse and faults (issue 19 items 1, 2, 4, 6, 7, 8; issue 18 item 5): nothing
silently wrong - unusable data is refused from the first step, a step without an answer token is not
a trained step, the counts survive a resume, a checkpoint never moves to another base model or split,
a full disk never truncates last.ckpt."""

from __future__ import annotations

import json
import os
import resource
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from finetune_utils import tiny_finetune_config, tiny_finetune_overrides
from img_lightning.checkpoint_files import checkpoint_problem
from img_lightning.checkpoint_io import CheckpointDiskFull
from img_lightning.config.loading import ConfigError
from img_lightning.encoders.export_manifest import read_manifest
from img_lightning.errors import UserError
from img_lightning.finetune.datamodule import NothingTrained, TooManyBadSamples
from img_lightning.finetune.offline import export_checkpoint
from img_lightning.finetune.provenance import OtherBaseModel
from img_lightning.finetune.training import run_finetune
from img_lightning.finetune.triplets import TripletDataError, scan_triplets
from preprocessing.demo_data import CORRUPT_JPEG, write_edit_triplets_parquet
from train_utils import CrashAt

BASE_WEIGHT = "model.model.multi_modal_projector.linear_1.weight"


def _corrupt(src, dst, rows):
    """``src`` with the original images of ``rows`` (indices, or "all") replaced by undecodable bytes."""
    import pyarrow as pa

    table = pq.read_table(src)
    field = table.schema.field("original_image")
    images = table.column("original_image").to_pylist()
    for i in range(len(images)) if rows == "all" else rows:
        images[i] = {"bytes": CORRUPT_JPEG, "path": images[i]["path"]}
    table = table.set_column(table.schema.get_field_index("original_image"), field, pa.array(images, field.type))
    pq.write_table(table, dst, row_group_size=8)
    return dst


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.parquet"
    write_edit_triplets_parquet(path, 40, seed=7, row_group_size=8, bad_rows=False)
    return path


def _last(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_data_whose_images_never_decode_is_refused_and_never_exported(good, tiny_llava_dir, tmp_path):
    """Issue 19.1: it used to train for every step asked and export the base model with exit 0."""
    data = _corrupt(good, tmp_path / "broken.parquet", "all")
    extra = {"trainer.max_steps": 2, "trainer.checkpoint_every_n_steps": 1, "optim.weight_decay": 0.1}
    with pytest.raises(TooManyBadSamples, match=r"4 of the 4 training samples read so far were unusable "
                                                r"\(4 corrupt_image\).*data.max_bad_fraction=0.01"):
        run_finetune(tiny_finetune_config(data, tiny_llava_dir, tmp_path, "default",
                                          **{**extra, "data.max_bad_fraction": 0.01}))
    assert not (tmp_path / "default" / "export").exists()
    # every sample may be bad (max_bad_fraction=1): the steps are not trained, and the run is an error
    with pytest.raises(NothingTrained, match=r"no sample was trained on in 2 optimizer steps: 8 of the 8"):
        run_finetune(tiny_finetune_config(data, tiny_llava_dir, tmp_path, "all_bad",
                                          **{**extra, "data.max_bad_fraction": 1.0}))
    assert not (tmp_path / "all_bad" / "export").exists()
    state = _last(tmp_path / "all_bad")
    counts = state["EditTripletDataModule"]
    assert (counts["samples_trained"], counts["empty_steps"], counts["steps"]) == (0, 2, 2)
    # AdamW never stepped: weight decay 0.1 left the trained weights as the base has them
    from safetensors.torch import load_file

    base = load_file(tiny_llava_dir / "model.safetensors")
    saved = base["multi_modal_projector.linear_1.weight"].float()  # the file's key (transformers' save layout)
    torch.testing.assert_close(state["state_dict"][BASE_WEIGHT], saved, atol=0, rtol=0)


def test_the_bad_fraction_applies_from_the_first_sample(good, tiny_llava_dir, tmp_path):
    """Issue 19.1: a small set with 14 % bad rows passed the 1 % default (counted only after 100 samples)."""
    data = _corrupt(good, tmp_path / "bad14.parquet", [3, 9, 14, 20, 27, 33])  # 6 of 40 rows: ~14 %
    with pytest.raises(TooManyBadSamples, match=r"data.max_bad_fraction=0.01"):
        run_finetune(tiny_finetune_config(data, tiny_llava_dir, tmp_path, "r14", **{
            "trainer.max_steps": 6, "data.max_bad_fraction": 0.01, "run.export": False}))
    # never on data within the limit: one bad sample in a whole epoch at a limit just above its share
    from img_lightning.finetune.plan import train_batches

    index = scan_triplets(good, 0.15)
    epoch = train_batches(index.train_ids, index.group_of, batch_size=4, rank=0, world_size=1, seed=0, epoch=0,
                          window=2)
    one = _corrupt(good, tmp_path / "bad1.parquet", [epoch[-1][-1]])  # the last sample of the epoch
    steps = len(epoch)
    result = run_finetune(tiny_finetune_config(one, tiny_llava_dir, tmp_path, "r1", **{
        "trainer.max_steps": steps, "data.max_bad_fraction": 1.01 / (steps * 4), "run.export": False}))
    assert json.loads((result.run_dir / "summary.json").read_text())["trained"]["samples_skipped"] == 1


class WatchWeights(Callback):
    """Per training batch: its real sample count and whether the projector's weight changed."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = pl_module.state_dict()[BASE_WEIGHT].clone()
        self._real = int(batch["num_real"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        changed = not torch.equal(self._before, pl_module.state_dict()[BASE_WEIGHT])
        self.steps.append((self._real, changed))


def test_a_step_without_an_answer_token_is_not_a_trained_step(good, tiny_llava_dir, tmp_path):
    """Issue 19.1: a batch whose every sample is unusable became a no-loss placeholder that AdamW still
    stepped on (weight decay, moments) and that samples_seen counted as real."""
    data = _corrupt(good, tmp_path / "mostly_bad.parquet", [i for i in range(40) if i % 4 != 0])  # 3 of 4 bad
    watch = WatchWeights()
    cfg = tiny_finetune_config(data, tiny_llava_dir, tmp_path, "mixed", **{
        "trainer.max_steps": 8, "data.max_bad_fraction": 1.0, "optim.weight_decay": 0.1,
        "trainer.val_check_interval": 100})
    result = run_finetune(cfg, [watch])
    empty = [changed for real, changed in watch.steps if real == 0]
    assert empty and not any(empty)  # there were empty steps, and none moved a weight
    assert all(changed for real, changed in watch.steps if real > 0)
    trained = sum(real for real, _ in watch.steps)
    training = read_manifest(result.export_dir)["training"]
    assert training["samples_seen"] == training["samples_trained"] == trained  # not 8 steps x 4
    assert (training["empty_steps"], training["trained_steps"]) == (len(empty), 8 - len(empty))
    assert json.loads((result.run_dir / "summary.json").read_text())["trained"]["samples_trained"] == trained


def test_bad_sample_counts_are_in_the_checkpoint_and_continue_after_a_resume(tiny_llava_dir, tmp_path):
    """Issue 18.5: the counts restarted at 0 after a resume."""
    data = tmp_path / "t.parquet"
    write_edit_triplets_parquet(data, 48, seed=3, row_group_size=8)  # one corrupt image among 40 training rows
    extra = {"trainer.max_steps": 12, "trainer.checkpoint_every_n_steps": 4, "run.export": False}
    run_finetune(tiny_finetune_config(data, tiny_llava_dir, tmp_path, "straight", **extra))
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run_finetune(tiny_finetune_config(data, tiny_llava_dir, tmp_path, "killed", **extra), [CrashAt(6)])
    run_finetune(tiny_finetune_config(data, tiny_llava_dir, tmp_path, "killed", **{**extra, "run.ckpt_path": "last"}))
    a, b = (_last(tmp_path / n)["EditTripletDataModule"] for n in ("straight", "killed"))
    keys = ("samples_read", "samples_skipped", "skip_counts", "samples_trained", "steps", "empty_steps")
    assert {k: b[k] for k in keys} == {k: a[k] for k in keys}
    assert a["samples_read"] == 48 and a["skip_counts"] == {"corrupt_image": 2}  # 1.2 epochs: read twice


def test_resume_or_export_onto_another_base_model_is_refused(tiny_llava_dir, tmp_path):
    """Issue 19.2: checkpoints drop frozen weights, so another mllm.path spliced two models."""
    from img_lightning.tiny.mllm import build_tiny_llava

    data = tmp_path / "t.parquet"
    write_edit_triplets_parquet(data, 24, seed=5, bad_rows=False)
    other = build_tiny_llava(tmp_path / "other-llava", seed=1)
    extra = {"trainer.max_steps": 2, "run.export": False}
    run_finetune(tiny_finetune_config(data, tiny_llava_dir, tmp_path, "run", **extra))
    moved = {**extra, "trainer.max_steps": 4, "run.ckpt_path": "last", "mllm.path": str(other),
             "run.allow_config_change": "[trainer.max_steps]"}
    with pytest.raises(OtherBaseModel, match=rf"trained from the base model .* at {tiny_llava_dir} .* names .* at "
                                             rf"{other}"):
        run_finetune(tiny_finetune_config(data, tiny_llava_dir, tmp_path, "run", **moved))
    with pytest.raises(OtherBaseModel, match=str(other)):
        export_checkpoint(tiny_finetune_config(data, other, tmp_path, "run", **extra), None, str(tmp_path / "x"))
    # the same base moved elsewhere (mllm.path is free on resume) is the same identity
    import shutil

    copy = shutil.copytree(tiny_llava_dir, tmp_path / "moved-llava")
    run_finetune(tiny_finetune_config(data, copy, tmp_path, "run", **{**moved, "mllm.path": str(copy)}))


def test_offline_export_describes_the_run_as_trained(tiny_llava_dir, tmp_path):
    """Issue 19.4: the manifest came from the current config (another held-out split recorded as
    trained so, and eval then scored training samples as held out)."""
    data = tmp_path / "t.parquet"
    write_edit_triplets_parquet(data, 24, seed=5, bad_rows=False)
    trained = {"trainer.max_steps": 2}
    run_finetune(tiny_finetune_config(data, tiny_llava_dir, tmp_path, "run", **trained, **{"run.export": False}))
    with pytest.raises(ConfigError, match=r"data.heldout_fraction: 0.15 -> 0.3"):
        export_checkpoint(tiny_finetune_config(data, tiny_llava_dir, tmp_path, "run",
                                               **{**trained, "data.heldout_fraction": 0.3}))
    other = tmp_path / "other.parquet"
    write_edit_triplets_parquet(other, 24, seed=6, bad_rows=False)
    with pytest.raises(UserError, match=r"is not the data .* was trained on"):
        export_checkpoint(tiny_finetune_config(data, tiny_llava_dir, tmp_path, "run",
                                               **{**trained, "data.input": str(other)}))
    path = export_checkpoint(tiny_finetune_config(data, tiny_llava_dir, tmp_path, "run",
                                                  **{**trained, "eval.limit": 3}))
    manifest = read_manifest(path)
    assert manifest["data"]["heldout_fraction"] == 0.15 and manifest["training"]["global_step"] == 2
    assert manifest["training"]["samples_seen"] == manifest["training"]["samples_trained"] > 0
    assert manifest["base"]["weights_sha256"]


def test_wrong_column_types_and_empty_sets_name_what_is_wrong(good, tiny_llava_dir, tmp_path, capsys):
    """Issue 19.6 and 19.7: an internal error, and "0 training samples cannot fill one batch" without why."""
    import pyarrow as pa

    from img_lightning.cli.finetune_mllm import main

    table = pq.read_table(good)
    ints = table.set_column(table.schema.get_field_index("edit_prompt"), "edit_prompt",
                            pa.array(range(table.num_rows), pa.int64()))
    pq.write_table(ints, tmp_path / "ints.parquet")
    with pytest.raises(TripletDataError, match=r"ints.parquet: column\(s\) of the wrong type: edit_prompt is int64 "
                                               r"\(expected a string column\)"):
        scan_triplets(tmp_path / "ints.parquet")
    strings = table.set_column(table.schema.get_field_index("original_image"), "original_image",
                               pa.array(["x.jpg"] * table.num_rows, pa.string()))
    pq.write_table(strings, tmp_path / "strings.parquet")
    args = tiny_finetune_overrides(tmp_path / "strings.parquet", tiny_llava_dir, tmp_path, "s")
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "original_image is string (expected a struct {bytes: binary" in err and "internal error" not in err
    empty = table.set_column(table.schema.get_field_index("edit_prompt"), "edit_prompt",
                             pa.array([""] * table.num_rows, pa.string()))
    pq.write_table(empty, tmp_path / "empty.parquet")
    assert main(["train", *tiny_finetune_overrides(tmp_path / "empty.parquet", tiny_llava_dir, tmp_path, "e")]) == 2
    err = capsys.readouterr().err
    assert "0 training samples cannot fill one batch" in err
    assert "40 rows read in 1 files: 40 with an empty edit_prompt" in err


class FillDisk(Callback):
    """From optimizer step ``step`` on, files cannot grow past half of the last checkpoint's size (the
    kernel's file-size limit: writes fail with EFBIG, as they fail with ENOSPC on a full disk)."""

    def __init__(self, step, run_dir):
        self.step = step
        self.last = Path(run_dir) / "checkpoints" / "last.ckpt"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            limit = max(1, os.path.getsize(self.last) // 2)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


@pytest.fixture
def file_size_limit_restored():
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    yield
    resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    signal.signal(signal.SIGXFSZ, handler)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_says_which_disk(
        good, tiny_llava_dir, tmp_path, file_size_limit_restored):
    """Issue 19.8: the message named a temporary file in /tmp, last.ckpt could be left truncated, and the
    resume died in PytorchStreamReader."""
    extra = {"trainer.max_steps": 4, "trainer.checkpoint_every_n_steps": 2, "run.export": False}
    run_dir = tmp_path / "full"
    with pytest.raises(CheckpointDiskFull) as caught:
        run_finetune(tiny_finetune_config(good, tiny_llava_dir, tmp_path, "full", **extra), [FillDisk(3, run_dir)])
    message = str(caught.value)
    assert f"the disk holding {run_dir / 'checkpoints'}" in message and "is full" in message
    assert "previous last.ckpt, if any, is intact" in message and "/tmp/tmp" not in message
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    last = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint_problem(last) is None and _last(run_dir)["global_step"] == 2
    assert not [p.name for p in last.parent.iterdir() if p.name != "last.ckpt"]  # no temporary left behind
    run_finetune(tiny_finetune_config(good, tiny_llava_dir, tmp_path, "full", **{**extra, "run.ckpt_path": "last"}))
    assert _last(run_dir)["global_step"] == 4


def test_an_export_whose_weights_changed_behind_its_manifest_is_refused(tiny_llava_dir, tiny_ip_adapter_dir,
                                                                        tmp_path, capsys):
    """Issue 19.3: the cache key hashes the manifest only, so replaced weights kept the old export's key."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file, save_file

    from img_lightning.config.encoders import MLLMConfig
    from img_lightning.encoders.checks import check_mllm
    from img_lightning.errors import Problems
    from preprocessing.cli import main as preprocess_main
    from preprocessing.demo_data import write_demo_parquet

    data = tmp_path / "t.parquet"
    write_edit_triplets_parquet(data, 24, seed=5, bad_rows=False)
    export = run_finetune(tiny_finetune_config(data, tiny_llava_dir, tmp_path, "exp",
                                               **{"trainer.max_steps": 2})).export_dir
    weights = export / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3  # same shapes, same size: other weights
    save_file(tensors, weights, metadata={"format": "pt"})
    pairs = tmp_path / "pairs.parquet"
    write_demo_parquet(pairs, 6, seed=0)
    argv = ["run", "configs/preprocess/demo.yaml", f"data.output={tmp_path / 'cache'}", f"data.input={pairs}",
            f"encoders.mllm.path={export}", f"encoders.ip.image_encoder_path={tiny_ip_adapter_dir}",
            f"encoders.ip.adapter_path={tiny_ip_adapter_dir}", "--no-progress"]
    assert preprocess_main(argv) == 2
    err = capsys.readouterr().err
    assert f"{export}: the weights are not the ones its manifest img_finetune.json lists (model.safetensors has " \
           f"sha256" in err and "internal error" not in err
    assert not list((tmp_path / "cache").glob("shard-*.tar"))
    # img-eval's pre-run check (check_mllm) reports it with the key to fix, before any image
    problems = Problems()
    mllm = OmegaConf.structured(MLLMConfig(model="img-lightning/tiny-llava", path=str(export)))
    check_mllm(mllm, problems)
    assert any(p.startswith("encoders.mllm.path: ") and "model.safetensors has sha256" in p for p in problems.items)
    # an unlisted weight file is refused too
    save_file(tensors, export / "model-extra.safetensors")
    problems = Problems()
    check_mllm(mllm, problems)
    assert any("model-extra.safetensors is not listed" in p for p in problems.items)
