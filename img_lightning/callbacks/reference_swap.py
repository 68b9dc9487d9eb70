"""Iteratively updated reference: copy f_theta into f_ref after k consecutive wins (paper §3.3).

"Win" means ``sum ||c_w - f_theta(c)||^2 < sum ||c_w - f_ref(c)||^2`` over the *global* batch of an
optimizer step: the per-rank sums are all-reduced first, so every rank takes the same decision at
the same step and the reference copies stay identical without any broadcast.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ..atomic import atomic_write
from ..log_steps import is_logging_step


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over the raw bytes of every parameter (exact equality check across ranks)."""
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ReferenceSwap(Callback):
    def __init__(self, patience: int = 10, log_dir: Optional[str | Path] = None) -> None:
        if patience < 1:
            raise ValueError(f"reference.patience must be >= 1, got {patience}")
        self.patience = patience
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.streak = 0
        self.swaps = 0
        self.last_swap_step = -1
        # the optimizer step last decided on; global_step 0 means no step yet (accumulating micro-batches)
        self._seen_step = 0

    @property
    def state_key(self) -> str:
        return "ReferenceSwap"

    def log_path(self, trainer: L.Trainer) -> Optional[Path]:
        return None if self.log_dir is None else self.log_dir / f"rank{trainer.global_rank}.jsonl"

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        """Drop logged swaps the (restored) state has not made yet.

        A run killed after a swap but before its next checkpoint replays the steps since that
        checkpoint on resume, swap included: without this the log would list that swap twice.
        """
        path = self.log_path(trainer)
        if path is None or not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["swap"] <= self.swaps]
        if len(kept) != len(lines):
            atomic_write(path, "".join(line + "\n" for line in kept))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._seen_step:  # accumulating gradients: no optimizer step yet
            return
        self._seen_step = step
        distances = pl_module.pop_swap_distances()
        distances = trainer.strategy.reduce(distances, reduce_op="sum")
        closer = bool(distances[0] < distances[1])
        self.streak = self.streak + 1 if closer else 0
        if self.streak >= self.patience:
            self._swap(trainer, pl_module, step)
        if not is_logging_step(trainer, after_optimizer_step=True):
            return
        pl_module.log("reference/streak", float(self.streak), on_step=True, on_epoch=False, batch_size=1)
        pl_module.log("reference/swaps", float(self.swaps), on_step=True, on_epoch=False, batch_size=1)

    @torch.no_grad()
    def _swap(self, trainer: L.Trainer, pl_module: Any, step: int) -> None:
        reference, aligner = pl_module.reference.state_dict(), pl_module.aligner.state_dict()
        for dst, src in zip(reference.values(), aligner.values(), strict=True):
            dst.copy_(src)
        self.streak = 0
        self.swaps += 1
        self.last_swap_step = step
        fingerprint = weights_fingerprint(pl_module.reference)
        self._check_ranks_agree(trainer, fingerprint, step)
        path = self.log_path(trainer)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            line = {"step": step, "swap": self.swaps, "fingerprint": fingerprint}
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")

    @staticmethod
    def _check_ranks_agree(trainer: L.Trainer, fingerprint: str, step: int) -> None:
        if trainer.world_size == 1:
            return
        mine = torch.tensor([int(fingerprint[:15], 16)], dtype=torch.int64, device=trainer.strategy.root_device)
        everyone = trainer.strategy.all_gather(mine).flatten()
        if not bool((everyone == mine).all()):
            raise RuntimeError(
                f"reference weights differ across ranks after the swap at step {step}: DDP replicas have "
                f"diverged (fingerprints {everyone.tolist()})"
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "streak": self.streak,
            "swaps": self.swaps,
            "last_swap_step": self.last_swap_step,
            "seen_step": self._seen_step,
            "patience": self.patience,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.streak = int(state_dict["streak"])
        self.swaps = int(state_dict["swaps"])
        self.last_swap_step = int(state_dict["last_swap_step"])
        self._seen_step = int(state_dict["seen_step"])
