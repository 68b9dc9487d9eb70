"""Run directories under misuse and faults (issue 19 items 5 and 8): one run per directory (an flock
that names its holder and that a requeued SLURM job takes over), atomic checkpoints (files and FSDP's
sharded directories), and resumes that skip a damaged checkpoint or name it."""

from __future__ import annotations

import errno
import json
import os
import platform
import subprocess
import sys
import time

import pytest
import torch

from img_lightning.cache.synthetic import write_synthetic_cache
from img_lightning.checkpoint_files import (
    DamagedCheckpoint,
    checkpoint_problem,
    finish_interrupted_swap,
    replaced_name,
    staging_name,
)
from img_lightning.checkpoint_io import CheckpointDiskFull, replace_directory
from img_lightning.run_dir import resolve_resume
from img_lightning.run_lock import LOCK_NAME, RunDirectoryInUse, acquire_run_lock, refuse_if_held
from train_utils import TINY_CACHE_DIMS, tiny_overrides

HOLD = """
import json, os, sys, time
from pathlib import Path
from img_lightning.run_lock import acquire_run_lock
lock = acquire_run_lock(Path(sys.argv[1]), "img-finetune-mllm train")
if len(sys.argv) > 2:  # pretend to be another node's process (a stale lock on a network file system)
    record = json.loads(Path(lock.path).read_text()); record["host"] = sys.argv[2]
    os.ftruncate(lock.fd, 0)
    os.pwrite(lock.fd, (json.dumps(record) + "\\n").encode(), 0)
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """Start a process holding a run directory's lock; it is killed at the end of the test."""
    procs = []

    def start(run_dir, env=None, host=None):
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), *([host] if host else [])],
                                stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_second_run_in_a_held_run_directory_is_refused_naming_the_holder(tmp_path, holder, capsys):
    """Issue 19.5: two img-train (or img-finetune-mllm train) with one run.name both exited 0."""
    from img_lightning.cli.train import main as train_main

    m = write_synthetic_cache(tmp_path / "cache", 16, **TINY_CACHE_DIMS)
    proc = holder(tmp_path / "runs" / "r", env={"SLURM_JOB_ID": "4242"})
    argv = tiny_overrides(tmp_path / "cache", m.cache_key, tmp_path / "runs", "r", **{"trainer.max_steps": 2})
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("img-train: error:") and f"{tmp_path / 'runs' / 'r'} is in use by another run" in err
    assert f"on host {platform.node()}, pid {proc.pid}, SLURM job 4242, since 20" in err
    assert not (tmp_path / "runs" / "r" / "config.yaml").exists()  # nothing of ours was written
    proc.kill()
    proc.wait()  # the kernel drops the lock of a dead holder: the run goes ahead
    assert train_main(argv) == 0
    assert (tmp_path / "runs" / "r" / "config.yaml").is_file()
    assert json.loads((tmp_path / "runs" / "r" / LOCK_NAME).read_text())["command"] == "img-train"


def test_the_finetune_is_refused_in_a_held_run_directory(tmp_path, holder, tiny_llava_dir):
    from finetune_utils import tiny_finetune_config
    from img_lightning.finetune.training import run_finetune

    holder(tmp_path / "ft")
    with pytest.raises(RunDirectoryInUse, match=r"img-finetune-mllm train on host"):
        run_finetune(tiny_finetune_config("unused.parquet", tiny_llava_dir, tmp_path, "ft"))


def test_a_requeued_slurm_job_takes_its_lock_over_and_other_jobs_are_refused(tmp_path, holder, monkeypatch):
    run_dir = tmp_path / "run"
    holder(run_dir, env={"SLURM_JOB_ID": "77"}, host="node-a")  # the job's earlier instance, on another node
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with pytest.raises(RunDirectoryInUse, match=r"on host node-a, pid \d+, SLURM job 77"):
        acquire_run_lock(run_dir, "img-train")
    with pytest.raises(RunDirectoryInUse):
        refuse_if_held(run_dir)  # what every other rank of job 78 checks: the whole job stops
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    refuse_if_held(run_dir)  # ranks of job 77 go ahead
    lock = acquire_run_lock(run_dir, "img-train")  # the requeued job 77 takes the lock over
    record = json.loads((run_dir / LOCK_NAME).read_text())
    assert (record["pid"], record["slurm_job_id"], record["host"]) == (os.getpid(), "77", platform.node())
    lock.release()


def test_a_live_process_of_the_same_job_on_this_host_is_not_taken_over(tmp_path, holder, monkeypatch):
    """Two runs started in one allocation (same job id) with one run.name: the second is refused."""
    holder(tmp_path / "run", env={"SLURM_JOB_ID": "5"})
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    with pytest.raises(RunDirectoryInUse):
        acquire_run_lock(tmp_path / "run", "img-train")


# -- checkpoints ---------------------------------------------------------------------------------------
def _ckpt(path, step):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "w": torch.arange(5000.0)}, path)
    return path


def test_resume_skips_a_damaged_last_checkpoint_for_the_previous_good_one(tmp_path, caplog):
    """Issue 19.8: a truncated last.ckpt made the resume die in PytorchStreamReader."""
    run = tmp_path / "run"
    older = _ckpt(run / "hpc_ckpt_1.ckpt", 2)
    last = _ckpt(run / "checkpoints" / "last.ckpt", 4)
    os.utime(older, (time.time() - 60, time.time() - 60))
    with open(last, "r+b") as fh:
        fh.truncate(last.stat().st_size // 2)
    assert "truncated" in checkpoint_problem(last) or "not a complete checkpoint" in checkpoint_problem(last)
    with caplog.at_level("WARNING", logger="img_lightning"):
        assert resolve_resume(run, "last") == str(older)
    assert any(f"skipping a damaged checkpoint: {last}" in r.getMessage() for r in caplog.records)
    older.write_bytes(b"not a checkpoint")
    with pytest.raises(DamagedCheckpoint, match=rf"(?s)every checkpoint to resume from is damaged:.*\n  {last}: "):
        resolve_resume(run, "last")
    with pytest.raises(DamagedCheckpoint, match=rf"run.ckpt_path={older}: the checkpoint is damaged"):
        resolve_resume(run, str(older))


def test_img_train_names_a_damaged_checkpoint_instead_of_an_internal_error(tmp_path, capsys):
    from img_lightning.cli.train import main as train_main

    m = write_synthetic_cache(tmp_path / "cache", 16, **TINY_CACHE_DIMS)
    argv = tiny_overrides(tmp_path / "cache", m.cache_key, tmp_path / "runs", "r", **{"trainer.max_steps": 3})
    assert train_main(argv) == 0
    last = tmp_path / "runs" / "r" / "checkpoints" / "last.ckpt"
    with open(last, "r+b") as fh:
        fh.truncate(1000)
    assert train_main([*argv, "run.ckpt_path=last", "trainer.max_steps=6", "run.allow_config_change=[trainer]"]) == 2
    err = capsys.readouterr().err
    assert f"img-train: error: every checkpoint to resume from is damaged:\n  {last}: " in err
    assert "Traceback" not in err and "PytorchStreamReader" not in err


def test_sharded_checkpoint_problems_are_found_without_loading(tmp_path):
    import torch.distributed.checkpoint as dcp

    ckpt = tmp_path / "last.ckpt"
    dcp.save({"model": {"w": torch.arange(10000.0)}}, checkpoint_id=str(ckpt))
    torch.save({"global_step": 3}, ckpt / "meta.pt")
    assert checkpoint_problem(ckpt) is None
    shard = next(ckpt.glob("*.distcp"))
    with open(shard, "r+b") as fh:
        fh.truncate(100)
    assert f"its shard {shard.name} is truncated" in checkpoint_problem(ckpt)
    shard.unlink()
    assert f"its shard {shard.name} is missing" in checkpoint_problem(ckpt)
    (ckpt / ".metadata").unlink()
    assert "without .metadata" in checkpoint_problem(ckpt)


def _fsdp_strategy():
    from img_lightning.finetune.strategy import atomic_fsdp_class

    return atomic_fsdp_class()(state_dict_type="sharded")


def _state(step):
    return {"state_dict": {"w": torch.full((4000,), float(step))}, "optimizer_states": [], "global_step": step}


def test_sharded_checkpoints_replace_the_previous_one_only_when_complete(tmp_path, monkeypatch):
    """Issue 19.8 for FSDP: Lightning wrote a sharded checkpoint into the existing last.ckpt directory,
    so a failure mid-save left shards of two steps. Here a full disk leaves the previous one whole."""
    import lightning.pytorch.strategies.fsdp as lightning_fsdp

    target = tmp_path / "checkpoints" / "last.ckpt"
    strategy = _fsdp_strategy()
    strategy.save_checkpoint(_state(1), target)
    assert checkpoint_problem(target) is None
    assert torch.load(target / "meta.pt", weights_only=True)["global_step"] == 1
    real_save = lightning_fsdp._distributed_checkpoint_save

    def fills_the_disk(state, path):
        real_save(state, path)  # the shards are written...
        with open(next(path.glob("*.distcp")), "r+b") as fh:
            fh.truncate(10)  # ...until the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(path / "__0_0.distcp"))

    monkeypatch.setattr(lightning_fsdp, "_distributed_checkpoint_save", fills_the_disk)
    with pytest.raises(CheckpointDiskFull, match=rf"the disk holding {target.parent} .* is full"):
        strategy.save_checkpoint(_state(2), target)
    assert checkpoint_problem(target) is None  # step 1, whole
    assert torch.load(target / "meta.pt", weights_only=True)["global_step"] == 1
    monkeypatch.setattr(lightning_fsdp, "_distributed_checkpoint_save", real_save)
    strategy.save_checkpoint(_state(3), target)  # the next save clears the partial one and replaces step 1
    assert torch.load(target / "meta.pt", weights_only=True)["global_step"] == 3
    assert not staging_name(target).exists() and not replaced_name(target).exists()


def test_a_directory_swap_cut_between_its_renames_is_completed_at_resume(tmp_path):
    import torch.distributed.checkpoint as dcp

    target = tmp_path / "run" / "checkpoints" / "last.ckpt"
    for path, step in ((target, 1), (staging_name(target), 2)):
        dcp.save({"model": {"w": torch.zeros(10) + step}}, checkpoint_id=str(path))
        torch.save({"global_step": step}, path / "meta.pt")
    os.replace(target, replaced_name(target))  # killed here, between the two renames
    assert resolve_resume(tmp_path / "run", "last") == str(target)
    assert torch.load(target / "meta.pt", weights_only=True)["global_step"] == 2
    assert not replaced_name(target).exists() and not staging_name(target).exists()
    # the same cut with an incomplete new one: the previous one goes back
    staged = staging_name(target)
    staged.mkdir()
    os.replace(target, replaced_name(target))
    finish_interrupted_swap(target)
    assert torch.load(target / "meta.pt", weights_only=True)["global_step"] == 2
    assert not staged.exists() and not replaced_name(target).exists()


def test_replace_directory_puts_the_new_one_in_place(tmp_path):
    target, staged = tmp_path / "last.ckpt", tmp_path / "new"
    for path, text in ((target, "old"), (staged, "new")):
        path.mkdir()
        (path / "f").write_text(text)
    replace_directory(staged, target)
    assert (target / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_which_ranks_look_at_the_lock(tmp_path, holder, monkeypatch):
    """Rank 0 judges (and holds); under SLURM every rank judges by the job id; the other ranks of a launch
    without SLURM (Lightning's DDP children, torchrun) leave it to their rank 0, which is another process."""
    from types import SimpleNamespace

    from img_lightning.run_lock import run_locked, take_run_lock

    cfg = SimpleNamespace(run=SimpleNamespace(root=str(tmp_path), name="run"))

    @run_locked
    def job(cfg, rank):
        take_run_lock(tmp_path / "run", "test", rank)
        return "ran"

    holder(tmp_path / "run", env={"SLURM_JOB_ID": "9"})
    for key in ("SLURM_JOB_ID", "SLURM_PROCID", "RANK"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RunDirectoryInUse):
        job(cfg, 0)
    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP child: its rank 0 decides
    assert job(cfg, 1) == "ran"
    monkeypatch.setenv("SLURM_JOB_ID", "10")
    monkeypatch.setenv("SLURM_PROCID", "1")  # a rank of another SLURM job: refused at entry
    with pytest.raises(RunDirectoryInUse, match="SLURM job 9"):
        job(cfg, 1)
    monkeypatch.setenv("SLURM_JOB_ID", "9")  # a rank of the holder's own job
    assert job(cfg, 1) == "ran"
