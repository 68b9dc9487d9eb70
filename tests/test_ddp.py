"""Two CPU processes under DDP (gloo): every rank swaps f_ref at the same steps to identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from img_lightning.aligner import ImplicitAligner
from img_lightning.cache.synthetic import write_synthetic_cache
from img_lightning.callbacks import weights_fingerprint
from train_utils import TINY_CACHE_DIMS, tiny_overrides


def test_two_process_ddp_reference_swaps_agree(tmp_path):
    dims = TINY_CACHE_DIMS
    key = write_synthetic_cache(tmp_path / "cache", 40, **dims).cache_key
    args = tiny_overrides(
        tmp_path / "cache", key, tmp_path / "runs", "ddp",
        **{"trainer.devices": 2, "trainer.strategy": "ddp", "trainer.max_steps": 12,
           "trainer.val_check_interval": 100, "data.num_workers": 1, "reference.patience": 2},
    )
    script = Path(sys.executable).parent / "img-train"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([str(script), *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run_dir = tmp_path / "runs" / "ddp"
    logs = {r: (run_dir / "reference_swaps" / f"rank{r}.jsonl").read_text().splitlines() for r in (0, 1)}
    swaps = [json.loads(line) for line in logs[0]]
    assert len(swaps) >= 2
    assert logs[0] == logs[1]  # same steps, same weights (sha256 of every byte), on both ranks

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    reference = ImplicitAligner(16, 8, 1, 2, 4)
    reference.load_state_dict({k[len("reference."):]: v for k, v in ckpt["state_dict"].items()
                               if k.startswith("reference.")})
    assert weights_fingerprint(reference) == swaps[-1]["fingerprint"]
    assert ckpt["callbacks"]["ReferenceSwap"]["swaps"] == len(swaps)
