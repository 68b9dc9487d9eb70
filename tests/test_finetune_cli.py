"""``img-finetune-mllm`` end to end: two CPU processes under DDP (gloo) through the CLI, and the SLURM
script handing the job to the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune_utils import tiny_finetune_overrides
from preprocessing.demo_data import write_edit_triplets_parquet

REPO = Path(__file__).resolve().parents[1]


def _env(**extra):
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


@pytest.mark.slow
def test_two_process_ddp_through_the_cli(tmp_path, tiny_llava_dir):
    data = tmp_path / "t.parquet"
    write_edit_triplets_parquet(data, 40, seed=5)  # 40 triplets + a corrupt image + an empty instruction
    args = tiny_finetune_overrides(data, tiny_llava_dir, tmp_path / "runs", "ddp", **{
        "trainer.devices": 2, "trainer.strategy": "ddp", "trainer.max_steps": 6, "data.batch_size": 2,
        "data.global_batch_size": 8, "trainer.checkpoint_every_n_steps": 3, "trainer.val_check_interval": 3})
    proc = subprocess.run([sys.executable, "-m", "img_lightning.cli.finetune_mllm", "train", *args], env=_env(),
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "ddp"
    summary = json.loads((run_dir / "summary.json").read_text())
    # global batch 8 = 2 per rank x 2 ranks x 2 accumulated micro-batches
    assert summary["world_size"] == 2 and summary["accumulate_grad_batches"] == 2 and summary["global_step"] == 6
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["EditTripletDataModule"]
    assert (state["world_size"], state["batch_size"]) == (2, 2)
    # every rank: train // (2 x 2) micro-batches per epoch; Lightning closes an epoch with a partial
    # accumulation, so epoch 0 took ceil(per_epoch / 2) optimizer steps and epoch 1 the rest
    per_epoch = state["train_samples"] // (2 * 2)
    steps_epoch0 = -(-per_epoch // 2)
    assert (state["epoch"], state["batches_done"]) == (1, (6 - steps_epoch0) * 2)
    skipped = {r: (run_dir / "skipped" / f"rank{r}.jsonl") for r in (0, 1)}
    lines = [json.loads(x) for p in skipped.values() if p.is_file() for x in p.read_text().splitlines()]
    assert {x["reason"] for x in lines} <= {"corrupt_image"} and len({x["key"] for x in lines}) <= 1
    assert (run_dir / "export" / "img_finetune.json").is_file()
    assert "export (encoders.mllm.path of img-preprocess)" in proc.stdout


def test_slurm_script_hands_the_job_to_the_cli(tmp_path):
    """slurm/finetune_mllm.sbatch with stand-in `srun` and `img-finetune-mllm` and --print-config: run
    directory from the job id, resume on, one task per GPU, the recipe's FSDP strategy kept."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (fake_bin / "img-finetune-mllm").write_text(
        f'#!/bin/bash\nexec "{sys.executable}" -m img_lightning.cli.finetune_mllm "$@"\n')
    for f in fake_bin.iterdir():
        f.chmod(0o755)
    env = _env(PATH=f"{fake_bin}:{os.environ['PATH']}", DATA="/data/ip2p", SLURM_JOB_NAME="img-finetune-mllm",
               SLURM_JOB_ID="777", SLURM_NTASKS_PER_NODE="8", SLURM_JOB_NUM_NODES="2", SLURM_CPUS_PER_TASK="10")
    proc = subprocess.run(["bash", str(REPO / "slurm" / "finetune_mllm.sbatch"), "mllm.questions=/q.json",
                           "--print-config"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for line in ("name: img-finetune-mllm-777", "ckpt_path: last", "devices: '8'", "num_nodes: 2", "strategy: fsdp",
                 "input: /data/ip2p", "num_workers: 8", "questions: /q.json", "global_batch_size: 128"):
        assert line in proc.stdout, line
