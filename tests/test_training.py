"""Training: exact resume, reference swaps, run directory, TensorBoard, export, CLI, SLURM."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.environments import SLURMEnvironment
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from img_lightning.aligner import ImplicitAligner
from img_lightning.cache.synthetic import write_synthetic_cache
from img_lightning.cli.train import main as train_main
from img_lightning.job import build_trainer
from img_lightning.training import run_training
from train_utils import TINY_CACHE_DIMS, CrashAt, poison_cache, srun_environment, tiny_config, tiny_overrides


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    dims = TINY_CACHE_DIMS
    train = write_synthetic_cache(root / "train", 26, seed=0, **dims)  # 6 steps/epoch at batch 4
    write_synthetic_cache(root / "val", 12, seed=1, **dims)
    return root / "train", root / "val", train.cache_key


class RecordBatches(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append((int(batch["epoch"]), int(batch["position"]), batch["index"].tolist()))


def _final_state(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt


@pytest.mark.parametrize("crash_step", [5, 7])
def test_killed_and_resumed_run_matches_uninterrupted_run(caches, tmp_path, crash_step):
    train, val, key = caches
    extra = {"data.num_workers": 2, "data.val_cache": str(val), "trainer.max_steps": 12,
             "trainer.checkpoint_every_n_steps": 3}

    straight = RecordBatches()
    run_training(tiny_config(train, key, tmp_path, "straight", **extra), [straight])

    first = RecordBatches()
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run_training(tiny_config(train, key, tmp_path, "killed", **extra), [first, CrashAt(crash_step)])
    resumed = RecordBatches()
    cfg = tiny_config(train, key, tmp_path, "killed", **{**extra, "run.ckpt_path": "last"})
    run_training(cfg, [resumed])

    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "killed")
    assert a["global_step"] == b["global_step"] == 12
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=1e-6, rtol=0, msg=k)
    assert a["callbacks"]["ReferenceSwap"] == b["callbacks"]["ReferenceSwap"]
    assert a["callbacks"]["ReferenceSwap"]["swaps"] >= 1
    assert a["FeatureCacheDataModule"] == b["FeatureCacheDataModule"]  # loader position is checkpointed

    # Samples: the resumed run trains exactly on what the uninterrupted one did after the checkpoint.
    checkpoint_step = (crash_step // 3) * 3
    assert first.seen[:checkpoint_step] == straight.seen[:checkpoint_step]
    assert resumed.seen == straight.seen[checkpoint_step:]
    # and within each epoch every training sample appears exactly once
    epoch0 = [i for e, _, idx in straight.seen if e == 0 for i in idx]
    assert len(epoch0) == len(set(epoch0)) == 24


def test_run_directory_tensorboard_and_export(caches, tmp_path):
    train, val, key = caches
    cfg = tiny_config(train, key, tmp_path, "run", **{"data.val_cache": str(val)})
    result = run_training(cfg)
    run_dir = tmp_path / "run"
    assert result.run_dir == run_dir
    assert (run_dir / "config.yaml").read_text().count("guidance_dim: 16") == 1
    info = json.loads((run_dir / "run_info.json").read_text())
    assert len(info["git"]["sha"]) == 40 or info["git"]["sha"] == "unknown"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert result.best_checkpoint and "best-step" in result.best_checkpoint

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/base", "train/pref", "train/dpo_margin", "train/spin_margin",
                "train/implicit_acc", "reference/swaps", "reference/streak", "lr-AdamW",
                "perf/samples_per_s", "perf/data_wait_share", "val/base", "val/identity",
                "val/rel_improvement", "val/implicit_acc", "val/closer_to_winner", "train/closer_to_winner"):
        assert tag in tags, tag
    swaps = [e.value for e in events.Scalars("reference/swaps")]
    assert swaps[-1] >= 1

    # export: official layout loads strictly; safetensors gives the same function
    official = ImplicitAligner.load_official(run_dir / "export" / "aligner.pth", dim_head=4)
    from_st = ImplicitAligner.load_official(run_dir / "export" / "aligner.safetensors", dim_head=4)
    g, ip = torch.randn(2, 5, 16), torch.randn(2, 4, 8)
    torch.testing.assert_close(official(g, ip), from_st(g, ip))
    assert not torch.allclose(official(g, ip), ip)  # it trained away from the identity
    assert result.metrics["val/base"] < result.metrics["val/identity"]

    # starting again in the same directory without asking to resume is refused
    with pytest.raises(FileExistsError, match="run.ckpt_path=last"):
        run_training(cfg)


def test_cli_help_print_config_and_misspelled_key(capsys, caches, tmp_path):
    with pytest.raises(SystemExit) as exc:
        train_main(["--help"])
    assert exc.value.code == 0
    assert "img-train" in capsys.readouterr().out

    assert train_main(["--print-config", "trainer.max_steps=7"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "patience: 10" in out

    assert train_main(["trainer.max_stepz=7"]) == 2
    assert "trainer.max_stepz" in capsys.readouterr().err

    train, _, _ = caches
    assert train_main(tiny_overrides(train, "0000000000000000", tmp_path, "badkey")) == 2
    assert "does not match" in capsys.readouterr().err


def test_cli_trains_and_reports(caches, tmp_path, capsys):
    train, val, key = caches
    args = tiny_overrides(train, key, tmp_path, "cli", **{"data.val_cache": str(val), "trainer.max_steps": 4})
    assert train_main(args) == 0
    out = capsys.readouterr().out
    assert "identity baseline" in out and "tensorboard --logdir" in out
    assert (tmp_path / "cli" / "export" / "aligner.pth").is_file()


def test_slurm_environment_is_picked_under_srun(monkeypatch, tmp_path, caches):
    train, _, key = caches
    srun_environment(monkeypatch, tmp_path, "img-train", "4242")
    cfg = tiny_config(train, key, tmp_path, "slurm")
    trainer = build_trainer(cfg, tmp_path / "slurm")
    env = trainer._accelerator_connector.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.job_id() == 4242
    # Lightning's auto-requeue saves inside the signal handler (mid-step): ours replaces it
    assert not env.auto_requeue


class SignalDuringStep(Callback):
    """SLURM's time-limit warning arriving in the middle of optimizer step ``step``: its batch is
    already handed to the training step, its update not yet applied."""

    def __init__(self, step):
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_time_limit_signal_saves_at_a_step_boundary_requeues_and_resumes_exactly(monkeypatch, tmp_path, caches):
    train, _, key = caches
    extra = {"data.num_workers": 2, "trainer.max_steps": 12, "trainer.checkpoint_every_n_steps": 4}
    straight = RecordBatches()
    run_training(tiny_config(train, key, tmp_path, "straight", **extra), [straight])

    scontrol_log = srun_environment(monkeypatch, tmp_path, "img-train", "4242")
    before = signal.getsignal(signal.SIGUSR1)

    first = RecordBatches()
    result = run_training(tiny_config(train, key, tmp_path, "requeued", **extra), [first, SignalDuringStep(6)])
    assert result.requeued_at == 7 and not result.exports  # saved after step 6's update; nothing final
    assert scontrol_log.read_text().split() == ["requeue", "4242"]
    saved = torch.load(tmp_path / "requeued" / "requeue" / "requeue-1.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 7 and len(first.seen) == 7
    assert signal.getsignal(signal.SIGUSR1) == before  # handler restored

    # the requeued job: same job id, same run directory, run.ckpt_path=last
    resumed = RecordBatches()
    done = run_training(tiny_config(train, key, tmp_path, "requeued", **{**extra, "run.ckpt_path": "last"}), [resumed])
    assert done.requeued_at is None and done.exports
    assert first.seen + resumed.seen == straight.seen  # no batch skipped or repeated
    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "requeued")
    assert a["global_step"] == b["global_step"] == 12
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=1e-6, rtol=0, msg=k)
    assert a["callbacks"]["ReferenceSwap"] == b["callbacks"]["ReferenceSwap"]


class FinalWeights(Callback):
    """The aligner's weights when ``fit`` ends: what the export must hold."""

    def on_fit_end(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.aligner.state_dict().items()}


class ValidationSteps(Callback):
    def __init__(self):
        self.steps = []

    def on_validation_end(self, trainer, pl_module):
        self.steps.append((trainer.state.fn.value, trainer.global_step))


def _export(run_dir, stem="aligner"):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "export" / f"{stem}.safetensors"))


def _assert_bitwise_equal(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_requeued_run_exports_its_final_weights_and_its_checkpoint_is_the_last_write(monkeypatch, tmp_path, caches):
    """With validation on: the final ``validate()`` must not reload the requeue checkpoint into the
    module (Lightning restores ``hpc_ckpt_*`` of its root under SLURM), and after the signal save
    nothing else may be written (a validation-on-stop made ModelCheckpoint replace the best-*.ckpt
    the saved state points to)."""
    train, val, key = caches
    extra = {"data.val_cache": str(val), "trainer.max_steps": 12, "trainer.val_check_interval": 4,
             "trainer.checkpoint_every_n_steps": 4}
    run_training(tiny_config(train, key, tmp_path, "straight", **extra))

    srun_environment(monkeypatch, tmp_path, "img-train", "4242")
    validations = ValidationSteps()
    cut = run_training(tiny_config(train, key, tmp_path, "requeued", **extra), [SignalDuringStep(5), validations])
    assert cut.requeued_at == 6
    assert validations.steps == [("fit", 4)]  # none when stopping at step 6
    run_dir = tmp_path / "requeued"
    saved_path = run_dir / "requeue" / "requeue-1.ckpt"
    saved = torch.load(saved_path, map_location="cpu", weights_only=True)
    best = [v["best_model_path"] for k, v in saved["callbacks"].items() if "val/base" in k]
    assert len(best) == 1 and best[0].endswith("best-step00000004.ckpt") and os.path.isfile(best[0])
    written_after = [p for p in run_dir.rglob("*.ckpt") if p.stat().st_mtime_ns > saved_path.stat().st_mtime_ns]
    assert not written_after

    final = FinalWeights()
    done = run_training(tiny_config(train, key, tmp_path, "requeued", **{**extra, "run.ckpt_path": "last"}), [final])
    assert done.requeued_at is None and done.metrics["val/base"] < done.metrics["val/identity"]
    exported = _export(run_dir)
    _assert_bitwise_equal(exported, final.state)  # the module's final weights, not a reload
    _assert_bitwise_equal(exported, _export(tmp_path / "straight"))
    _assert_bitwise_equal(_export(run_dir, "aligner_best"), _export(tmp_path / "straight", "aligner_best"))
    assert json.loads((run_dir / "export" / "aligner.json").read_text())["global_step"] == 12


def test_a_run_directory_with_old_hpc_checkpoints_resumes_and_exports_its_final_weights(monkeypatch, tmp_path, caches):
    """Older versions wrote ``hpc_ckpt_N.ckpt`` at the top of the run directory: ``run.ckpt_path=last``
    still resumes from it, and Lightning's auto-restore never puts it back into the module."""
    train, val, key = caches
    extra = {"data.val_cache": str(val), "trainer.max_steps": 8, "trainer.val_check_interval": 4,
             "trainer.checkpoint_every_n_steps": 4}
    srun_environment(monkeypatch, tmp_path, "img-train", "4242")
    run_training(tiny_config(train, key, tmp_path, "old", **extra), [SignalDuringStep(5)])
    run_dir = tmp_path / "old"
    (run_dir / "requeue" / "requeue-1.ckpt").rename(run_dir / "hpc_ckpt_1.ckpt")  # the old layout
    final = FinalWeights()
    run_training(tiny_config(train, key, tmp_path, "old", **{**extra, "run.ckpt_path": "last"}), [final])
    assert json.loads((run_dir / "run_info.json").read_text())["resumed_from"] is None
    resumed = json.loads((run_dir / "resumes" / "001" / "run_info.json").read_text())["resumed_from"]
    assert resumed.endswith("hpc_ckpt_1.ckpt")
    _assert_bitwise_equal(_export(run_dir), final.state)


class ChangeWeightsInValidation(Callback):
    def on_validation_start(self, trainer, pl_module):
        if trainer.state.fn.value == "validate":
            with torch.no_grad():
                next(pl_module.aligner.parameters()).add_(1.0)


def test_weights_that_change_during_the_final_validation_are_not_exported(tmp_path, caches):
    from img_lightning.weights_guard import WeightsChangedError

    train, val, key = caches
    cfg = tiny_config(train, key, tmp_path, "changed", **{"data.val_cache": str(val), "trainer.max_steps": 2})
    with pytest.raises(WeightsChangedError, match="final validation"):
        run_training(cfg, [ChangeWeightsInValidation()])
    assert not (tmp_path / "changed" / "export").exists()


def test_slurm_sbatch_script_passes_the_job_to_img_train(tmp_path):
    """Run slurm/train.sbatch with a stand-in `srun` and `--print-config`: the run directory comes from
    the job id, resume is on, one task per GPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    srun = fake_bin / "srun"
    srun.write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    srun.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "CACHE": "/data/cache", "SLURM_JOB_NAME": "img-train", "SLURM_JOB_ID": "4242",
           "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_PER_TASK": "6",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", str(repo / "slurm" / "train.sbatch"), "optim.lr=5e-5", "--print-config"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for line in ("name: img-train-4242", "ckpt_path: last", "devices: '4'", "num_nodes: 2", "strategy: ddp",
                 "cache: /data/cache", "lr: 5.0e-05", "num_workers: 4", "guidance_dim: 5120"):
        assert line in out, line


def test_data_wait_share_reflects_a_slow_loader(caches, tmp_path, monkeypatch):
    import time as _time

    from img_lightning.data.loader import ThreadedBatchLoader

    read = ThreadedBatchLoader._read

    delay = 0.6  # per batch: well above a tiny step's compute even on a loaded 2-core machine

    def slow_read(self, request):
        _time.sleep(delay)
        return read(self, request)

    monkeypatch.setattr(ThreadedBatchLoader, "_read", slow_read)
    train, _, key = caches
    run_training(tiny_config(train, key, tmp_path, "slow", **{"trainer.max_steps": 8, "trainer.log_every_n_steps": 4}))
    events = EventAccumulator(str(tmp_path / "slow" / "tensorboard")).Reload()
    shares = [e.value for e in events.Scalars("perf/data_wait_share")]
    assert len(shares) == 2 and all(0.5 < s <= 1.0 for s in shares), shares
    rates = [e.value for e in events.Scalars("perf/samples_per_s")]
    assert all(r < 4 / delay for r in rates)  # at most one batch of 4 per `delay`


class RecordGuidance(Callback):
    """What the training step receives after the host-to-device hooks."""

    def __init__(self):
        self.dtypes = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.dtypes.add((batch["guidance"].dtype, "guidance_scale" in batch))


@pytest.fixture(scope="module")
def fp8_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    dims = TINY_CACHE_DIMS
    manifest = write_synthetic_cache(root / "train", 26, seed=0, guidance_dtype="float8_e4m3fn", **dims)
    return root / "train", manifest.cache_key


def test_fp8_cache_killed_and_resumed_run_is_bitwise_identical(fp8_cache, tmp_path):
    train, key = fp8_cache
    extra = {"data.num_workers": 2, "trainer.max_steps": 9, "trainer.checkpoint_every_n_steps": 3}
    seen = RecordGuidance()
    run_training(tiny_config(train, key, tmp_path, "straight", **extra), [seen])
    assert seen.dtypes == {(torch.float32, False)}  # widened on the device, before the step
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run_training(tiny_config(train, key, tmp_path, "killed", **extra), [CrashAt(5)])
    run_training(tiny_config(train, key, tmp_path, "killed", **{**extra, "run.ckpt_path": "last"}))
    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "killed")
    assert a["global_step"] == b["global_step"] == 9
    for k, v in a["state_dict"].items():
        assert torch.equal(b["state_dict"][k], v), k
    assert a["FeatureCacheDataModule"] == b["FeatureCacheDataModule"]


class RecordKept(Callback):
    """The rows each training step keeps: the device-side check masks bad ones (``sample_ok``)."""

    def __init__(self) -> None:
        self.masked = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if "sample_ok" in batch:
            self.masked += int((~batch["sample_ok"]).sum())


@pytest.mark.parametrize("finite_check", ["reader", "device"])
def test_non_finite_samples_are_dropped_counted_and_stop_the_run_above_the_limit(tmp_path, caplog, finite_check):
    """A shard rewritten with NaN features (same size, checksums off): the sample is dropped by the
    reader (or masked out of the loss on the device), named in the log, counted in the checkpoint, and
    the run stops once the bad fraction passes data.max_bad_fraction."""
    root = tmp_path / "nan"
    manifest = write_synthetic_cache(root, 26, seed=0, **TINY_CACHE_DIMS)
    poison_cache(root, {24, 25})  # the last shard's 2 samples
    ok = tiny_config(root, manifest.cache_key, tmp_path, "tolerant", **{"trainer.max_steps": 6,
                                                                      "data.max_bad_fraction": 0.2,
                                                                      "data.finite_check": finite_check})
    kept = RecordKept()
    with caplog.at_level("WARNING"):
        run_training(ok, [kept])
    assert "poisoned" in caplog.text and "non-finite values in guidance" in caplog.text
    assert kept.masked == (2 if finite_check == "device" else 0)
    state = _final_state(tmp_path / "tolerant")
    assert state["FeatureCacheDataModule"]["bad_samples"] == 2  # one epoch of 6 batches read both
    assert all(bool(torch.isfinite(v).all()) for v in state["state_dict"].values() if v.is_floating_point())
    strict = tiny_config(root, manifest.cache_key, tmp_path, "strict", **{"trainer.max_steps": 6,
                                                                        "data.finite_check": finite_check})
    with pytest.raises(RuntimeError, match=r"NaN/Inf.*max_bad_fraction=0.01"):
        run_training(strict)


def test_trains_from_bf16_guidance_beside_fp16_ip_tokens(tmp_path):
    """The SDXL recipes store the MLLM's bf16 states as bf16 (bit-exact) and the fp16 IP-Adapter
    tokens as fp16: one cache, two 16-bit dtypes, read and trained as any other."""
    from img_lightning.cache import BatchReader, CacheView

    cache = tmp_path / "mixed"
    manifest = write_synthetic_cache(cache, 26, guidance_dim=16, ip_tokens=4, ip_dim=8, min_tokens=3, max_tokens=9,
                                     shard_size=8, dtype="float16", guidance_dtype="bfloat16")
    assert manifest.tensors["guidance"]["dtype"] == "bfloat16" and manifest.tensors["ip"]["dtype"] == "float16"
    batch = BatchReader(CacheView.open(cache)).read(range(4))
    assert batch["guidance"].dtype == torch.bfloat16 and batch["ip_win"].dtype == torch.float16
    result = run_training(tiny_config(cache, manifest.cache_key, tmp_path, "mixed",
                                      **{"trainer.max_steps": 4, "trainer.checkpoint_every_n_steps": 2}))
    state = _final_state(tmp_path / "mixed")
    assert state["global_step"] == 4 and result.exports
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_one_swap_decision_per_optimizer_step_with_gradient_accumulation(caches, tmp_path, monkeypatch):
    """With accumulation, the reference-swap rule decides once per optimizer step, on the distances
    of the whole global batch, never on the micro-batches before the first step."""
    from img_lightning.module import AlignerModule

    train, _, key = caches
    decided = []
    original = AlignerModule.pop_swap_distances

    def spy(self):
        decided.append(self.trainer.global_step)
        return original(self)

    monkeypatch.setattr(AlignerModule, "pop_swap_distances", spy)
    run_training(tiny_config(train, key, tmp_path, "acc", **{"trainer.max_steps": 4,
                                                              "trainer.accumulate_grad_batches": 2,
                                                              "trainer.checkpoint_every_n_steps": 2}))
    assert decided == [1, 2, 3, 4]


def test_torch_threads_knob(caches, tmp_path):
    from img_lightning.config.loading import ConfigError

    train, _, key = caches
    before = torch.get_num_threads()
    try:
        run_training(tiny_config(train, key, tmp_path, "threads", **{"trainer.max_steps": 1, "run.torch_threads": 1}))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="run.torch_threads"):
        tiny_config(train, key, tmp_path, "bad", **{"run.torch_threads": 0})


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_time_limit_signal_while_the_job_starts_is_kept_for_the_first_step(monkeypatch, tmp_path, caches,
                                                                              accumulate):
    """SIGUSR1 ends a process by default; SLURM may send the warning while the step is still importing
    or opening data. img-train's entry point catches it from the start, and the run saves at its first
    step boundary and requeues: after the first optimizer step, never after the first micro-batch of
    an accumulation window (whose batch the saved position would count as trained without its update)."""
    from img_lightning.time_limit_signal import catch_time_limit_signal

    train, _, key = caches
    scontrol_log = srun_environment(monkeypatch, tmp_path, "img-train", "4242")
    before = signal.getsignal(signal.SIGUSR1)
    try:
        catch_time_limit_signal()
        os.kill(os.getpid(), signal.SIGUSR1)  # still alive
        result = run_training(tiny_config(train, key, tmp_path, "early",
                                          **{"trainer.accumulate_grad_batches": accumulate}))
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert result.requeued_at == 1 and (tmp_path / "early" / "requeue" / "requeue-1.ckpt").is_file()
    saved = torch.load(tmp_path / "early" / "requeue" / "requeue-1.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 1
    assert saved["FeatureCacheDataModule"]["batches_done"] == accumulate  # the micro-batches of one step
    assert scontrol_log.read_text().split() == ["requeue", "4242"]


def test_a_signal_at_a_validation_step_saves_after_that_validation(monkeypatch, tmp_path, caches):
    """Stopped at step 4, where a validation is due: it runs before the save (a resumed run skips the
    validation of the step it resumes at), so the requeued run validates at the same steps as an
    uninterrupted one and picks the same best checkpoint."""
    train, val, key = caches
    extra = {"data.val_cache": str(val), "trainer.max_steps": 12, "trainer.val_check_interval": 4,
             "trainer.checkpoint_every_n_steps": 4}
    straight = ValidationSteps()
    run_training(tiny_config(train, key, tmp_path, "straight", **extra), [straight])
    srun_environment(monkeypatch, tmp_path, "img-train", "4242")
    first, resumed = ValidationSteps(), ValidationSteps()
    cut = run_training(tiny_config(train, key, tmp_path, "requeued", **extra), [SignalDuringStep(3), first])
    assert cut.requeued_at == 4 and first.steps == [("fit", 4)]
    run_training(tiny_config(train, key, tmp_path, "requeued", **{**extra, "run.ckpt_path": "last"}), [resumed])
    assert first.steps + resumed.steps == straight.steps
    for stem in ("aligner", "aligner_best"):
        _assert_bitwise_equal(_export(tmp_path / "requeued", stem), _export(tmp_path / "straight", stem))


def test_a_failed_requeue_fails_the_job_with_the_reason(monkeypatch, tmp_path, caches):
    """``scontrol requeue`` refused: the job must not end as if training were complete."""
    from img_lightning.callbacks.requeue import RequeueError

    train, _, key = caches
    scontrol_log = srun_environment(monkeypatch, tmp_path, "img-train", "4242")
    (tmp_path / "bin" / "scontrol").write_text('#!/bin/sh\necho "Requeue of job 4242 not allowed" >&2\nexit 1\n')
    with pytest.raises(RequeueError, match="not allowed.*run.ckpt_path=last"):
        run_training(tiny_config(train, key, tmp_path, "refused", **{"trainer.max_steps": 6}), [SignalDuringStep(2)])
    assert (tmp_path / "refused" / "requeue" / "requeue-1.ckpt").is_file() and not scontrol_log.exists()


def test_no_checkpoint_is_written_after_the_requeue_checkpoint(monkeypatch, tmp_path, caches):
    """Stopped at step 2, before this process saved any last.ckpt: Lightning's ModelCheckpoint would
    write one when training ends, after the requeue checkpoint, and the resume would take it."""
    from img_lightning.run_dir import resolve_resume

    train, _, key = caches
    srun_environment(monkeypatch, tmp_path, "img-train", "4242")
    run_training(tiny_config(train, key, tmp_path, "early", **{"trainer.checkpoint_every_n_steps": 4}),
                 [SignalDuringStep(1)])
    run_dir = tmp_path / "early"
    saved = run_dir / "requeue" / "requeue-1.ckpt"
    assert [p.name for p in run_dir.rglob("*.ckpt") if p.stat().st_mtime_ns > saved.stat().st_mtime_ns] == []
    assert resolve_resume(run_dir, "last") == str(saved)
