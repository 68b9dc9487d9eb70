"""What a finetune checkpoint was trained from: the resolved config and the base model's identity.

A checkpoint holds only the trained weights (the frozen tower, a LoRA run's whole base, are re-read
from ``mllm.path``), and ``mllm.path`` may change on resume (a model moved to faster storage). So
resuming, or exporting, with ``mllm.path`` pointing at *another* base model spliced two models -
the tower (or the LoRA base) of the new one, the trained weights of the old - with exit code 0.

:class:`RunRecord` saves with every checkpoint the run's resolved config and the identity of its
base: the sha256 of its ``config.json`` and weight files (hashed in parallel threads, once per
process, by rank 0, and broadcast). Resuming onto a base with other weights is refused, naming both;
the offline export compares the same identity, and builds its manifest from the saved config.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback

from ..config.encoders import MLLMConfig
from ..config.finetune_mllm import FinetuneMLLMConfig
from ..config.loading import to_container
from ..errors import UserError
from ..hashing import files_sha256

log = logging.getLogger(__name__)
WEIGHT_SUFFIXES = (".safetensors", ".bin")


class OtherBaseModel(UserError):
    """The checkpoint was trained from another base model than ``mllm`` names now."""


def base_identity(mllm_cfg: MLLMConfig) -> dict[str, Any]:
    """``{"model", "path", "sha256"}`` of the base model folder: ``sha256`` over the sha256 of its
    ``config.json`` and every weight file (``name:sha256`` lines, sorted by name)."""
    from ..encoders.mllm import mllm_folder

    folder = mllm_folder(mllm_cfg, key="mllm")
    files = sorted(p for p in Path(folder).iterdir()
                   if p.is_file() and (p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES)))
    size = sum(p.stat().st_size for p in files)
    log.info("hashing the base model's weights (%d files, %.1f GB) to record what this run trains from",
             len(files), size / 1e9)
    hashes = files_sha256(files)
    lines = "".join(f"{p.name}:{hashes[p]}\n" for p in files)
    return {"model": str(mllm_cfg.model), "path": str(folder),
            "sha256": hashlib.sha256(lines.encode()).hexdigest()}


def base_mismatch(saved: Optional[dict], now: dict, what: str) -> Optional[str]:
    """Why ``what`` (a checkpoint) cannot be used with the base ``now`` (None: it can)."""
    if not saved or saved.get("sha256") == now.get("sha256"):
        return None
    return (f"{what} was trained from the base model {saved.get('model')} at {saved.get('path')} (weights sha256 "
            f"{str(saved.get('sha256'))[:16]}...), but mllm names {now['model']} at {now['path']} (weights sha256 "
            f"{now['sha256'][:16]}...). The checkpoint holds only the trained weights, so the rest would come from "
            f"another model. Point mllm.path at the base it was trained from, or start a new run (another run.name)")


class RunRecord(Callback):
    """Saves ``{"config", "base"}`` with every checkpoint; refuses to resume onto another base."""

    def __init__(self, cfg: FinetuneMLLMConfig) -> None:
        self.config = to_container(cfg)
        self.mllm_cfg = cfg.mllm
        self.base: Optional[dict[str, Any]] = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.base is None:
            mine = base_identity(self.mllm_cfg) if trainer.is_global_zero else None
            self.base = trainer.strategy.broadcast(mine)  # one hasher; every rank checks the same identity

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config, "base": self.base}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.base is None:
            return  # not fitting (no identity computed): nothing to compare with
        problem = base_mismatch(state_dict.get("base"), self.base, "the checkpoint to resume")
        if problem:
            raise OtherBaseModel(problem)


def saved_record(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The :class:`RunRecord` state of a loaded checkpoint ({} for checkpoints made before it)."""
    return (checkpoint.get("callbacks") or {}).get(RunRecord.__qualname__, {}) or {}
