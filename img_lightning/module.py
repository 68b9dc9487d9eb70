"""Thin LightningModule wiring f_theta, the frozen reference f_ref and the objective.

The reference-swap *rule* lives in :class:`img_lightning.callbacks.ReferenceSwap`; this module
only accumulates the distances it compares.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MeanMetric

from .aligner import ImplicitAligner, load_state_dict_file
from .cache.quant import dequantize_batch
from .log_steps import is_logging_step
from .objective import REDUCTIONS, preference_objective, squared_distance

_TRAIN_LOGS = ("loss", "base", "pref", "dpo_margin", "spin_margin", "implicit_acc", "ref_acc")


def _build_aligner(model_cfg: Any, seed: int) -> ImplicitAligner:
    # A private RNG stream: the initialisation depends on `seed` only, not on what ran before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ImplicitAligner(
            guidance_dim=model_cfg.guidance_dim,
            dim=model_cfg.dim,
            depth=model_cfg.depth,
            heads=model_cfg.heads,
            dim_head=model_cfg.dim_head,
            ff_mult=model_cfg.ff_mult,
        )


class AlignerModule(L.LightningModule):
    def __init__(self, model: Any, objective: Any, reference: Any, optim: Any, seed: int = 42) -> None:
        """Arguments are the ``model``, ``objective``, ``reference`` and ``optim`` config blocks."""
        super().__init__()
        if objective.reduction not in REDUCTIONS:
            raise ValueError(f"objective.reduction must be one of {REDUCTIONS}, got {objective.reduction!r}")
        if reference.init not in ("random", "copy"):
            raise ValueError(f"reference.init must be 'random' or 'copy', got {reference.init!r}")
        self.model_cfg, self.objective_cfg, self.reference_cfg, self.optim_cfg = model, objective, reference, optim
        self.aligner = _build_aligner(model, seed)
        if model.init_from:
            self.aligner.load_state_dict(load_state_dict_file(model.init_from), strict=True)
        self.reference = _build_aligner(model, reference.seed)
        if reference.init == "copy":
            self.reference.load_state_dict(self.aligner.state_dict())
        # Frozen, and never in the optimizer; it has no dropout/norm statistics, so no eval() needed.
        self.reference.requires_grad_(False)
        # Sum of ||c_w - f_theta||^2 and ||c_w - f_ref||^2 since the last optimizer step.
        self.register_buffer("swap_distances", torch.zeros(2, dtype=torch.float64), persistent=False)
        self.val_metrics = torch.nn.ModuleDict(
            {k: MeanMetric() for k in ("base", "pref", "implicit_acc", "identity", "ref_base")}
        )

    # ------------------------------------------------------------------ steps
    def _unpack(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # 8-bit guidance: FeatureCacheDataModule already widened it on the device after the copy;
        # this covers batches from anywhere else (a no-op for float guidance).
        batch = dequantize_batch(batch)
        return (
            batch["guidance"].float(),
            batch["guidance_mask"],
            batch["ip_lose"].float(),
            batch["ip_win"].float(),
        )

    def _forward_pair(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        guidance, mask, lose, win = self._unpack(batch)
        pred = self.aligner(guidance, lose, mask)
        with torch.no_grad():
            ref_pred = self.reference(guidance, lose, mask)
        out = preference_objective(
            pred,
            ref_pred,
            win,
            lose,
            lambda_pref=self.objective_cfg.lambda_pref,
            beta=self.objective_cfg.beta,
            reduction=self.objective_cfg.reduction,
        )
        return out, lose, win

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out, _, _ = self._forward_pair(batch)
        with torch.no_grad():
            self.swap_distances += torch.stack((out["dist_win"].sum(), out["dist_win_ref"].sum())).double()
        if is_logging_step(self._trainer):
            bs = batch["ip_lose"].shape[0]
            for key in _TRAIN_LOGS:
                self.log(f"train/{key}", out[key], on_step=True, on_epoch=False, batch_size=bs, prog_bar=key == "loss")
        return out["loss"]

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        out, lose, win = self._forward_pair(batch)
        bs = lose.shape[0]
        identity = squared_distance(win, lose, self.objective_cfg.reduction).mean()
        values = {
            "base": out["base"],
            "pref": out["pref"],
            "implicit_acc": out["implicit_acc"],
            "identity": identity,
            "ref_base": out["dist_win_ref"].mean(),
        }
        for key, value in values.items():
            self.val_metrics[key].update(value, weight=bs)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            for metric in self.val_metrics.values():
                metric.reset()
            return
        # MeanMetric.compute() reduces sums and counts over ranks: exact with unequal batch counts.
        values = {k: m.compute() for k, m in self.val_metrics.items()}
        for metric in self.val_metrics.values():
            metric.reset()
        if not all(torch.isfinite(v) for v in values.values()):
            return
        values["rel_improvement"] = 1.0 - values["base"] / values["identity"].clamp_min(1e-12)
        for key, value in values.items():
            self.log(f"val/{key}", value, sync_dist=False, rank_zero_only=False)

    def pop_swap_distances(self) -> Tensor:
        """Distances accumulated since the last optimizer step (then reset)."""
        out = self.swap_distances.clone()
        self.swap_distances.zero_()
        return out

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        cfg = self.optim_cfg
        optimizer = torch.optim.AdamW(
            self.aligner.parameters(),
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        )
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else int(self.trainer.estimated_stepping_batches)
        schedule = lr_lambda(cfg.schedule, cfg.warmup_steps, total, cfg.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """LR multiplier per optimizer step: linear warm-up, then constant (paper) or cosine."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {schedule!r}")

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def aligner_weights_from_checkpoint(path: str) -> dict[str, Tensor]:
    """f_theta's weights from a Lightning checkpoint (read with ``weights_only=True``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k[len("aligner.") :]: v for k, v in state.items() if k.startswith("aligner.")}
