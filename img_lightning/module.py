"""Thin LightningModule wiring f_theta, the frozen reference f_ref and the objective.

The reference-swap *rule* lives in :class:`img_lightning.callbacks.ReferenceSwap`; this module
only accumulates the distances it compares.
"""

from __future__ import annotations

from typing import cast

import lightning as L
import torch
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from omegaconf import OmegaConf
from torch import Tensor
from torch.optim import Optimizer
from torchmetrics import MeanMetric

from .aligner import ImplicitAligner
from .cache.quant import dequantize_batch
from .config.loading import to_container
from .config.train import AlignerConfig, ObjectiveConfig, OptimConfig, ReferenceConfig
from .errors import NonFiniteError
from .log_steps import is_logging_step
from .objective import batch_mean, preference_objective, squared_distance

_TRAIN_LOGS = ("loss", "base", "pref", "dpo_margin", "spin_margin", "implicit_acc", "closer_to_winner", "ref_acc")


def _build_aligner(model_cfg: AlignerConfig, seed: int) -> ImplicitAligner:
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
    # Buffers (registered in __init__), declared so they read as tensors, not as ``Tensor | Module``.
    swap_distances: Tensor
    skipped_steps: Tensor

    def __init__(self, model: AlignerConfig, objective: ObjectiveConfig, reference: ReferenceConfig,
                 optim: OptimConfig, seed: int = 42) -> None:
        """Arguments are the ``model``, ``objective``, ``reference`` and ``optim`` config blocks.

        They are saved as plain hyper-parameters (``hparams.yaml``, the checkpoint), so
        ``AlignerModule.load_from_checkpoint(path)`` rebuilds the module with ``weights_only``
        loading. ``model.init_from`` weights are applied when fitting starts (:meth:`setup`), never
        when a checkpoint is loaded (its weights win anyway).
        """
        super().__init__()
        self.save_hyperparameters({"model": to_container(model), "objective": to_container(objective),
                                   "reference": to_container(reference), "optim": to_container(optim),
                                   "seed": int(seed)})
        # The blocks again, rebuilt from those plain hyper-parameters (as a checkpoint load rebuilds them).
        model = cast(AlignerConfig, OmegaConf.create(self.hparams["model"]))
        reference = cast(ReferenceConfig, OmegaConf.create(self.hparams["reference"]))
        self.model_cfg, self.reference_cfg = model, reference
        self.objective_cfg = cast(ObjectiveConfig, OmegaConf.create(self.hparams["objective"]))
        self.optim_cfg = cast(OptimConfig, OmegaConf.create(self.hparams["optim"]))
        self.aligner = _build_aligner(model, seed)
        self.reference = _build_aligner(model, reference.seed)
        if reference.init == "copy":
            self.reference.load_state_dict(self.aligner.state_dict())
        self._initialised = False
        # Frozen, and never in the optimizer; it has no dropout/norm statistics, so no eval() needed.
        self.reference.requires_grad_(False)
        # Sum of ||c_w - f_theta||^2 and ||c_w - f_ref||^2 since the last optimizer step.
        self.register_buffer("swap_distances", torch.zeros(2, dtype=torch.float64), persistent=False)
        # Optimizer steps skipped for a non-finite gradient (optim.skip_nonfinite); checkpointed.
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self._batch_index: Tensor | None = None
        self.val_metrics = torch.nn.ModuleDict(
            {k: MeanMetric() for k in ("base", "pref", "implicit_acc", "closer_to_winner", "identity", "ref_base")}
        )

    def setup(self, stage: str) -> None:
        """Start f_theta (and a copied f_ref) from ``model.init_from``; a resumed run's checkpoint
        is restored after this and overrides it."""
        if stage != "fit" or self._initialised or not self.model_cfg.init_from:
            return
        self._initialised = True
        start = ImplicitAligner.load_official(self.model_cfg.init_from, **self.aligner.dims)
        self.aligner.load_state_dict(start.state_dict())
        if self.reference_cfg.init == "copy":
            self.reference.load_state_dict(start.state_dict())

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
            # The device-side NaN/Inf check's verdict (data/device_check.py); absent when the reader checked.
            keep=batch.get("sample_ok"),
        )
        return out, lose, win

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self._batch_index = batch.get("index")
        out, _, _ = self._forward_pair(batch)
        with torch.no_grad():
            d_win, d_ref = out["dist_win"], out["dist_win_ref"]
            keep = batch.get("sample_ok")
            if keep is not None:  # masked samples take no part in the reference-swap comparison
                d_win, d_ref = torch.where(keep, d_win, 0.0), torch.where(keep, d_ref, 0.0)
            self.swap_distances += torch.stack((d_win.sum(), d_ref.sum())).double()
        if is_logging_step(self._trainer):
            bs = batch["ip_lose"].shape[0]
            for key in _TRAIN_LOGS:
                self.log(f"train/{key}", out[key], on_step=True, on_epoch=False, batch_size=bs, prog_bar=key == "loss")
        return out["loss"]

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        out, lose, win = self._forward_pair(batch)
        keep = batch.get("sample_ok")
        bs = lose.shape[0] if keep is None else keep.sum()
        identity = batch_mean(squared_distance(win, lose, self.objective_cfg.reduction), keep)
        values = {
            "base": out["base"],
            "pref": out["pref"],
            "implicit_acc": out["implicit_acc"],
            "closer_to_winner": out["closer_to_winner"],
            "identity": identity,
            "ref_base": batch_mean(out["dist_win_ref"], keep),
        }
        for key, value in values.items():
            self._val_metrics()[key].update(value, weight=bs)

    def _val_metrics(self) -> dict[str, MeanMetric]:
        """The validation metrics as what they are (a ModuleDict hands them out as plain Modules)."""
        return {k: cast(MeanMetric, m) for k, m in self.val_metrics.items()}

    def on_validation_epoch_end(self) -> None:
        metrics = self._val_metrics()
        if self.trainer.sanity_checking:
            for metric in metrics.values():
                metric.reset()
            return
        # MeanMetric.compute() reduces sums and counts over ranks: exact with unequal batch counts.
        values = {k: m.compute() for k, m in metrics.items()}
        for metric in metrics.values():
            metric.reset()
        bad = [k for k, v in values.items() if not bool(torch.isfinite(v))]
        if bad:
            raise NonFiniteError(
                f"validation at step {self.global_step} gave non-finite {', '.join('val/' + k for k in bad)}: the "
                f"aligner's weights or the validation cache hold NaN/Inf; nothing from this step is usable"
            )
        values["rel_improvement"] = 1.0 - values["base"] / values["identity"].clamp_min(1e-12)
        for key, value in values.items():
            self.log(f"val/{key}", value, sync_dist=False, rank_zero_only=False)

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Stop (or, with ``optim.skip_nonfinite``, skip) a step whose gradient holds NaN/Inf.

        Under DDP the gradients are already all-reduced here, so every rank sees the same verdict
        and takes the same decision without another collective. A NaN anywhere in a batch (data or
        numerics) reaches the loss and then every gradient, so checking the gradient covers both.
        With ``16-mixed`` precision the GradScaler skips such steps by design; we leave them to it.
        """
        if self.trainer.precision == "16-mixed":
            return
        grads = [p.grad for p in self.aligner.parameters() if p.grad is not None]
        if not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))):
            return
        if int(self.skipped_steps) < self.optim_cfg.skip_nonfinite:
            self.skipped_steps += 1
            for p in self.aligner.parameters():
                p.grad = None  # AdamW leaves parameters without a gradient untouched
            self.log("train/skipped_steps", self.skipped_steps.float(), on_step=True, on_epoch=False, batch_size=1)
            return
        raise NonFiniteError(
            f"non-finite gradient at optimizer step {self.global_step} (rank {self.global_rank} trained on "
            f"samples {self._describe_batch()}). The loss or the data diverged; lower optim.lr, set "
            f"optim.grad_clip, check the cache with `img-preprocess verify`, or allow "
            f"optim.skip_nonfinite=N skipped steps. Skipped so far: {int(self.skipped_steps)}."
        )

    def _describe_batch(self) -> str:
        """The cache keys of the batch just trained on, when the DataModule can name them."""
        if self._batch_index is None:
            return "(unknown)"
        index = self._batch_index.detach().cpu().tolist()
        view = getattr(getattr(self.trainer, "datamodule", None), "train_view", None)
        if view is None:
            return str(index)
        keys = [view.keys[i].decode() if isinstance(view.keys[i], bytes) else str(view.keys[i]) for i in index]
        return ", ".join(keys[:16]) + (f" ... ({len(keys)} in all)" if len(keys) > 16 else "")

    def pop_swap_distances(self) -> Tensor:
        """Distances accumulated since the last optimizer step (then reset)."""
        out = self.swap_distances.clone()
        self.swap_distances.zero_()
        return out

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        cfg = self.optim_cfg
        beta1, beta2 = cfg.betas  # two, checked when the config loads
        optimizer = torch.optim.AdamW(
            self.aligner.parameters(),
            lr=cfg.lr,
            betas=(beta1, beta2),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        )
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else int(self.trainer.estimated_stepping_batches)
        scheduler = build_scheduler(optimizer, cfg.schedule, cfg.warmup_steps, total, cfg.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int,
                    min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-optimizer-step lr: linear warm-up (``lr * (s + 1) / warmup`` for step ``s < warmup``), then
    constant (the paper) or a cosine from ``lr`` down to ``min_ratio * lr`` at ``total_steps``."""
    from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, SequentialLR

    after: torch.optim.lr_scheduler.LRScheduler
    if schedule == "constant":
        after = ConstantLR(optimizer, factor=1.0, total_iters=0)
    elif schedule == "cosine":
        base_lr = optimizer.param_groups[0]["lr"]
        after = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=min_ratio * base_lr)
    else:
        raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {schedule!r}")
    if warmup_steps <= 0:
        return after
    if warmup_steps == 1:  # one warm-up step at the full lr (LinearLR needs total_iters >= 1)
        warmup: torch.optim.lr_scheduler.LRScheduler = ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        warmup = LinearLR(optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0, total_iters=warmup_steps - 1)
    return SequentialLR(optimizer, [warmup, after], milestones=[warmup_steps])


def aligner_weights_from_checkpoint(path: str) -> dict[str, Tensor]:
    """f_theta's weights from a Lightning checkpoint (read with ``weights_only=True``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k[len("aligner.") :]: v for k, v in state.items() if k.startswith("aligner.")}
