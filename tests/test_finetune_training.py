"""The MLLM finetuning job on the tiny LLaVA / Qwen2.5-VL: exact resume, run directory, TensorBoard,
LoRA, export -> img-preprocess, the cache key of an export."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from finetune_utils import tiny_finetune_config, tiny_finetune_overrides
from img_lightning.config.loading import ConfigError
from img_lightning.encoders.export_manifest import MANIFEST_NAME, read_manifest
from img_lightning.finetune.training import run_finetune
from preprocessing.demo_data import write_edit_triplets_parquet
from train_utils import CrashAt, srun_environment


@pytest.fixture(scope="module")
def triplets(tmp_path_factory):
    path = tmp_path_factory.mktemp("triplets") / "ip2p.parquet"
    write_edit_triplets_parquet(path, 48, seed=3, row_group_size=8)  # + a corrupt image, an empty instruction
    return path


class RecordBatches(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append((int(batch["epoch"]), int(batch["position"]), list(batch["keys"])))


def _state(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_killed_and_resumed_run_matches_uninterrupted_run(triplets, tiny_llava_dir, tmp_path):
    # 40 training triplets at batch 4: 10 batches/epoch, so 12 steps cross an epoch; threads on
    extra = {"trainer.max_steps": 12, "trainer.checkpoint_every_n_steps": 4, "data.num_workers": 2, "run.export": False}
    straight = RecordBatches()
    run_finetune(tiny_finetune_config(triplets, tiny_llava_dir, tmp_path, "straight", **extra), [straight])
    first = RecordBatches()
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run_finetune(tiny_finetune_config(triplets, tiny_llava_dir, tmp_path, "killed", **extra), [first, CrashAt(6)])
    resumed = RecordBatches()
    run_finetune(tiny_finetune_config(triplets, tiny_llava_dir, tmp_path, "killed",
                                      **{**extra, "run.ckpt_path": "last"}), [resumed])
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "killed")
    assert a["global_step"] == b["global_step"] == 12
    assert set(a["state_dict"]) == set(b["state_dict"]) and len(a["state_dict"]) > 10
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=1e-6, rtol=0, msg=k)
    assert a["EditTripletDataModule"] == b["EditTripletDataModule"]
    # the resumed run trains on exactly what the uninterrupted one did after the checkpoint (step 4)
    assert first.seen[:4] == straight.seen[:4] and resumed.seen == straight.seen[4:]
    epoch0 = [k for e, _, keys in straight.seen if e == 0 for k in keys]
    assert len(epoch0) == len(set(epoch0))  # within an epoch every sample at most once


def test_lora_dropout_masks_are_seeded_so_a_resume_is_exact(triplets, tiny_llava_dir, tmp_path):
    # LoRA dropout 0.5: the masks are drawn from (run.seed, rank, epoch, position), never from a
    # generator state a restart would lose
    extra = {"finetune.method": "lora", "finetune.lora.r": 4, "finetune.lora.alpha": 8, "finetune.lora.dropout": 0.5,
             "optim.lr": 2e-3, "trainer.max_steps": 4, "trainer.checkpoint_every_n_steps": 2, "run.export": False}
    run_finetune(tiny_finetune_config(triplets, tiny_llava_dir, tmp_path, "straight", **extra))
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run_finetune(tiny_finetune_config(triplets, tiny_llava_dir, tmp_path, "killed", **extra), [CrashAt(3)])
    torch.rand(7)  # whatever the process's generators did in between
    run_finetune(tiny_finetune_config(triplets, tiny_llava_dir, tmp_path, "killed",
                                      **{**extra, "run.ckpt_path": "last"}))
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "killed")
    assert a["global_step"] == b["global_step"] == 4
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=1e-6, rtol=0, msg=k)


def test_run_directory_tensorboard_summary_and_export(triplets, tiny_llava_dir, tmp_path):
    cfg = tiny_finetune_config(triplets, tiny_llava_dir, tmp_path, "run", **{"trainer.max_steps": 12})
    result = run_finetune(cfg)
    run_dir = tmp_path / "run"
    for name in ("config.yaml", "run_info.json", "summary.json", "checkpoints/last.ckpt", "export/config.json",
                 f"export/{MANIFEST_NAME}", "export/model.safetensors"):
        assert (run_dir / name).exists(), name
    assert json.loads((run_dir / "run_info.json").read_text())["git"]["sha"]
    # every sample's question is recorded: the key's stable choice from the question set
    import pyarrow.parquet as pq

    from img_lightning.encoders.questions import builtin_question_set

    record = pq.read_table(run_dir / "samples.parquet")
    questions = builtin_question_set("img-v1")
    keys, chosen = record.column("key").to_pylist(), record.column("question_index").to_pylist()
    assert len(keys) == 49 and chosen == [questions.index_for(k) for k in keys] and len(set(chosen)) > 10
    assert record.schema.metadata[b"questions_sha256"].decode() == questions.sha256
    summary = json.loads((run_dir / "summary.json").read_text())
    # 12 steps = 1.2 epochs: the corrupt image was read (and skipped) once in each epoch
    assert summary["data"]["empty_instructions"] == 1 and summary["skipped"]["train"] == {"corrupt_image": 2}
    assert "val/loss" in result.metrics and summary["metrics"]["val/loss"] == result.metrics["val/loss"]
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "val/loss", "lr-AdamW/lm", "lr-AdamW/projector", "perf/tokens_per_s_per_device",
                "perf/padding_share", "perf/samples_per_s", "perf/data_wait_share", "train/grad_norm",
                "final/val/loss"):
        assert tag in tags, tag
    # one event file, with the run's hyper-parameters and its final validation loss (HParams dashboard)
    assert len(list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))) == 1
    assert events.Scalars("final/val/loss")[-1].value == pytest.approx(result.metrics["val/loss"])
    assert any(k.endswith("session_start_info") for k in events.PluginTagToContent("hparams"))
    lrs = [e.value for e in events.Scalars("lr-AdamW/lm")]
    assert max(lrs) == pytest.approx(1e-3) and lrs[-1] < max(lrs) / 10  # warm-up then cosine decay
    manifest = read_manifest(run_dir / "export")
    assert manifest["training"]["global_step"] == 12 and manifest["conversation"]["prompt_format"] == "llava_v0"
    assert manifest["questions"]["name"] == "img-v1" and len(manifest["weights"]) == 1
    # a fresh start in a directory with checkpoints is refused; a resume with another lr too
    with pytest.raises(FileExistsError):
        run_finetune(tiny_finetune_config(triplets, tiny_llava_dir, tmp_path, "run"))
    with pytest.raises(ConfigError, match="optim.lr"):
        run_finetune(tiny_finetune_config(triplets, tiny_llava_dir, tmp_path, "run",
                                          **{"run.ckpt_path": "last", "optim.lr": 0.5}))


def test_lora_trains_adapters_and_projector_only_and_merges_on_export(triplets, tiny_llava_dir, tmp_path):
    from safetensors.torch import load_file

    extra = {"finetune.method": "lora", "finetune.lora.r": 4, "finetune.lora.alpha": 8, "optim.lr": 2e-3,
             "optim.projector_lr": 2e-4, "trainer.max_steps": 4}
    result = run_finetune(tiny_finetune_config(triplets, tiny_llava_dir, tmp_path, "lora", **extra))
    ckpt = _state(tmp_path / "lora")
    keys = list(ckpt["state_dict"])
    assert keys and all("lora_" in k or "multi_modal_projector" in k for k in keys)
    assert any("language_model" in k and "lora_A" in k for k in keys) and not any("vision_tower" in k for k in keys)
    groups = {g["name"]: g["lr"] for g in ckpt["optimizer_states"][0]["param_groups"]}
    assert set(groups) == {"lm", "projector"}
    base = load_file(tiny_llava_dir / "model.safetensors")
    merged = load_file(result.export_dir / "model.safetensors")
    assert set(merged) == set(base)  # a plain llava-hf folder: adapters merged away
    q = next(k for k in base if "language_model" in k and "layers.0.self_attn.q_proj.weight" in k)
    assert not torch.equal(merged[q], base[q])  # the adapters changed the weights
    tower = next(k for k in base if "vision_tower" in k and "layers.0.self_attn.q_proj.weight" in k)
    assert torch.equal(merged[tower], base[tower])  # the tower is frozen
    # the merge is checked on held-out samples, by the training job and by `img-finetune-mllm export`
    check = read_manifest(result.export_dir)["merge_check"]
    assert check["input"].startswith("held-out batch") and check["max_abs_logit_diff"] < 1e-3
    from img_lightning.finetune.offline import export_checkpoint

    cfg = tiny_finetune_config(triplets, tiny_llava_dir, tmp_path, "lora", **extra)
    check = read_manifest(export_checkpoint(cfg, None, str(tmp_path / "again")))["merge_check"]
    assert check["input"] == "held-out batch" and check["samples"] == 4 and check["positions"] >= 4
    assert check["max_abs_logit_diff"] < 1e-3 and check["top1_agreement"] == 1.0


def test_qwen_trains_and_exports_with_its_chat_template(triplets, tiny_qwen_dir, tmp_path):
    result = run_finetune(tiny_finetune_config(triplets, tiny_qwen_dir, tmp_path, "qwen", backend="qwen2_5_vl",
                                               **{"trainer.max_steps": 3}))
    manifest = read_manifest(result.export_dir)
    assert manifest["conversation"]["prompt_format"] == "chat_template" and manifest["base"]["backend"] == "qwen2_5_vl"
    assert "val/loss" in result.metrics


def test_export_feeds_img_preprocess_and_joins_the_cache_key(triplets, tiny_llava_dir, tiny_ip_adapter_dir, tmp_path):
    from img_lightning.cache.reader import CacheView
    from img_lightning.config.loading import load_config
    from img_lightning.config.preprocess import PreprocessConfig
    from img_lightning.finetune.offline import export_checkpoint
    from img_lightning.recipe import cache_key_of
    from preprocessing.cli import main as preprocess_main
    from preprocessing.demo_data import write_demo_parquet

    cfg = tiny_finetune_config(triplets, tiny_llava_dir, tmp_path, "exp", **{"trainer.max_steps": 2})
    export = run_finetune(cfg).export_dir
    # the same run exported again from its checkpoint by `img-finetune-mllm export`: the same weights
    again = export_checkpoint(cfg, None, str(tmp_path / "again"))
    assert (again / "model.safetensors").read_bytes() == (export / "model.safetensors").read_bytes()

    pairs = tmp_path / "pairs.parquet"
    write_demo_parquet(pairs, 12, seed=0)
    common = [f"data.input={pairs}", f"encoders.ip.image_encoder_path={tiny_ip_adapter_dir}",
              f"encoders.ip.adapter_path={tiny_ip_adapter_dir}"]
    assert preprocess_main(["run", "configs/preprocess/demo.yaml", f"data.output={tmp_path / 'cache'}",
                            f"encoders.mllm.path={export}", "--no-progress", *common]) == 0
    view = CacheView.open(tmp_path / "cache")
    assert view.num_samples == 12 and view.guidance_dim == 64

    def key(path):
        return cache_key_of(load_config(PreprocessConfig, ["configs/preprocess/demo.yaml"],
                                        [*common, "data.output=x", f"encoders.mllm.path={path}"]))

    assert view.manifest.cache_key == key(export)
    assert key(export) != key(tiny_llava_dir)  # a finetuned export is another MLLM
    assert key(export) != key(again)  # same config, another export (its manifest differs)
    assert key(export) == key(export)
    no_path = cache_key_of(load_config(PreprocessConfig, ["configs/preprocess/demo.yaml"], [*common, "data.output=x"]))
    assert key(tiny_llava_dir) == no_path  # a plain local folder is a location, not an identity


def test_cli_train_print_config_and_errors(triplets, tiny_llava_dir, tmp_path, capsys):
    from img_lightning.cli.finetune_mllm import main

    args = tiny_finetune_overrides(triplets, tiny_llava_dir, tmp_path, "cli", **{"trainer.max_steps": 2})
    assert main(["train", *args]) == 0
    out = capsys.readouterr().out
    assert "export (encoders.mllm.path of img-preprocess)" in out and "tensorboard --logdir" in out
    assert main(["train", "configs/finetune_mllm/llava13b_full.yaml", "--print-config"]) == 0
    printed = capsys.readouterr().out
    for line in ("strategy: fsdp", "lr: 2.0e-05", "global_batch_size: 128", "max_length: 2048", "warmup_ratio: 0.03"):
        assert line in printed, line
    assert main(["train", *args, "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert main(["train", *args, "run.name=other", "data.global_batch_size=6"]) == 2
    assert "not a multiple" in capsys.readouterr().err
    assert main(["train", *args, "run.name=other2", f"mllm.path={tmp_path / 'no-model'}"]) == 2
    err = capsys.readouterr().err
    assert "mllm.path=" in err and "does not exist" in err and "Traceback" not in err


class SignalAfterMicroBatch(Callback):
    """SLURM's time-limit warning arriving inside a gradient-accumulation window (after micro-batch
    ``batch_idx``'s backward, before the optimizer step that will use it)."""

    def __init__(self, batch_idx):
        self.batch_idx = batch_idx

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch_idx:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_time_limit_signal_inside_accumulation_saves_at_the_step_and_resumes_exactly(
        triplets, tiny_llava_dir, tmp_path, monkeypatch):
    extra = {"trainer.max_steps": 4, "trainer.accumulate_grad_batches": 2, "trainer.checkpoint_every_n_steps": 2,
             "run.export": False}
    straight = RecordBatches()
    run_finetune(tiny_finetune_config(triplets, tiny_llava_dir, tmp_path, "straight", **extra), [straight])

    scontrol_log = srun_environment(monkeypatch, tmp_path, "img-finetune-mllm", "77")
    first = RecordBatches()
    cut = run_finetune(tiny_finetune_config(triplets, tiny_llava_dir, tmp_path, "requeued", **extra),
                       [first, SignalAfterMicroBatch(4)])
    # micro-batch 4 opened step 3's window: the save waits for that step (batches 4 and 5)
    assert cut.requeued_at == 3 and len(first.seen) == 6
    assert scontrol_log.read_text().split() == ["requeue", "77"]
    resumed = RecordBatches()
    run_finetune(tiny_finetune_config(triplets, tiny_llava_dir, tmp_path, "requeued",
                                      **{**extra, "run.ckpt_path": "last"}), [resumed])
    assert first.seen + resumed.seen == straight.seen
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "requeued")
    assert a["global_step"] == b["global_step"] == 4
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=1e-6, rtol=0, msg=k)


class FinalModelWeights(Callback):
    """The MLLM's weights when ``fit`` ends: what the export must hold."""

    def on_fit_end(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


def _exported_weights(export_dir):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(export_dir, dtype=torch.float32).state_dict()


def test_requeued_finetune_exports_its_final_weights_with_validation_on(triplets, tiny_llava_dir, tmp_path,
                                                                        monkeypatch):
    """The final validation must not reload the requeue checkpoint (Lightning restores ``hpc_ckpt_*``
    of its root under SLURM): the export is the module's final weights, bit for bit those of an
    uninterrupted run."""
    extra = {"trainer.max_steps": 6, "trainer.val_check_interval": 3, "trainer.checkpoint_every_n_steps": 3}
    straight = run_finetune(tiny_finetune_config(triplets, tiny_llava_dir, tmp_path, "straight", **extra))
    assert "val/loss" in straight.metrics

    srun_environment(monkeypatch, tmp_path, "img-finetune-mllm", "77")
    cut = run_finetune(tiny_finetune_config(triplets, tiny_llava_dir, tmp_path, "requeued", **extra),
                       [SignalAfterMicroBatch(3)])
    assert cut.requeued_at == 4 and cut.export_dir is None
    final = FinalModelWeights()
    done = run_finetune(tiny_finetune_config(triplets, tiny_llava_dir, tmp_path, "requeued",
                                             **{**extra, "run.ckpt_path": "last"}), [final])
    assert done.metrics["val/loss"] == straight.metrics["val/loss"]
    exported, reference = _exported_weights(done.export_dir), _exported_weights(straight.export_dir)
    assert set(exported) == set(final.state) == set(reference)
    for k, v in final.state.items():
        assert torch.equal(exported[k], v), k  # the module's final weights, not a reload
        assert torch.equal(reference[k], v), k
