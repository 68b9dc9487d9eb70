"""LightningModule of the MLLM finetune: answer-only next-token loss, param groups, schedule, guards.

The model is built in :meth:`configure_model` (Lightning calls it before FSDP wraps the module and
before a checkpoint is restored), so the module itself is cheap to construct and its
hyper-parameters are plain dicts (``weights_only`` checkpoint loading).

Loss: the language model's hidden states are computed once, and ``lm_head`` runs only at the
positions that predict an answer token - the logits of a 2048-token batch over a 32K vocabulary
(~4 GB in float32 at batch 16) are never materialised. The loss is the mean over the answer
tokens of the micro-batch, as LLaVA's trainer computes it.

Randomness: ``run.seed`` seeds everything at setup (``seed_everything``) and LoRA's initialisation;
the torch generators are re-seeded before every training micro-batch from ``(run.seed, rank,
data epoch, batch position)``, so LoRA's dropout masks are a pure function of the sample position:
a resumed run draws the masks an uninterrupted one would have, with no generator state to
checkpoint (Lightning does not save it).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional, cast

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from omegaconf import OmegaConf
from torch import Tensor
from torch.optim import Optimizer
from torchmetrics import MeanMetric

from ..config.encoders import MLLMConfig
from ..config.finetune_mllm import FinetuneMethodConfig, FinetuneOptimConfig
from ..config.loading import to_container
from ..errors import NonFiniteError
from ..log_steps import is_logging_step
from .model import HFModel, build_trainable_model, inner, is_projector_parameter
from .samples import IGNORE

if TYPE_CHECKING:
    from torch.distributed.fsdp import FullyShardedDataParallel

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


class MLLMFinetuneModule(L.LightningModule):
    def __init__(self, mllm: MLLMConfig, finetune: FinetuneMethodConfig, optim: FinetuneOptimConfig,
                 strategy: str = "auto", seed: int = 42) -> None:
        """``mllm``, ``finetune``, ``optim``: the config blocks of the same names; ``strategy``:
        ``fsdp`` builds the model for FSDP (everything float32, checkpointing by the strategy)."""
        super().__init__()
        self.save_hyperparameters({"mllm": to_container(mllm), "finetune": to_container(finetune),
                                   "optim": to_container(optim), "strategy": str(getattr(strategy, "value", strategy)),
                                   "seed": int(seed)})
        # The blocks again, rebuilt from those plain hyper-parameters (as a checkpoint load rebuilds them).
        self.mllm_cfg = cast(MLLMConfig, OmegaConf.create(self.hparams["mllm"]))
        self.ft_cfg = cast(FinetuneMethodConfig, OmegaConf.create(self.hparams["finetune"]))
        self.optim_cfg = cast(FinetuneOptimConfig, OmegaConf.create(self.hparams["optim"]))
        self.sharded = self.hparams["strategy"] == "fsdp"
        self.backend = str(self.mllm_cfg.backend)
        self.model: Optional[torch.nn.Module] = None
        # LoRA / frozen parts: the checkpoint holds the trainable weights only (the base is re-read
        # from mllm.path); on_load_checkpoint checks that every trainable weight is there.
        self.strict_loading = self.sharded
        self.val_loss = MeanMetric()
        self._batch_keys: list[str] = []

    # ------------------------------------------------------------------ randomness
    def setup(self, stage: str) -> None:
        L.seed_everything(int(self.hparams["seed"]), workers=False, verbose=False)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Dropout masks from ``(seed, rank, epoch, position)``: the same after a resume."""
        if "epoch" in batch and "position" in batch:
            torch.manual_seed(batch_seed(int(self.hparams["seed"]), self.global_rank, int(batch["epoch"]),
                                         int(batch["position"])))

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is None:
            self.model = build_trainable_model(self.mllm_cfg, self.ft_cfg, sharded=self.sharded,
                                               seed=int(self.hparams["seed"]))

    @property
    def core(self) -> HFModel:
        """The transformers model (under a PEFT wrapper, if any)."""
        assert self.model is not None, "configure_model() has not run"
        return inner(self.model)

    def answer_loss(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """``(sum of the answer tokens' cross-entropy, number of answer tokens)``."""
        core = self.core
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self._vision_dtype())
        out = core.model(**inputs, use_cache=False, return_dict=True)
        hidden = out.last_hidden_state
        target = batch["labels"][:, 1:]
        mask = target != IGNORE
        logits = core.lm_head(hidden[:, :-1][mask]).float()
        loss_sum = F.cross_entropy(logits, target[mask], reduction="sum")
        return loss_sum, mask.sum()

    def _vision_dtype(self) -> torch.dtype:
        from .model import vision_tower

        assert self.model is not None, "configure_model() has not run"
        try:
            return next(vision_tower(self.model, self.backend).parameters()).dtype
        except StopIteration:
            return torch.float32

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        self._batch_keys = list(batch.get("keys", []))
        loss_sum, n = self.answer_loss(batch)
        loss = loss_sum / n.clamp_min(1)
        if is_logging_step(self._trainer):
            bs = int(batch["input_ids"].shape[0])
            self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, batch_size=bs, prog_bar=True)
            self.log("train/answer_tokens", n.float(), on_step=True, on_epoch=False, batch_size=bs)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss_sum, n = self.answer_loss(batch)
        # Token-weighted over every rank and batch: the held-out loss per answer token.
        self.val_loss.update(loss_sum / n.clamp_min(1), weight=n.float())

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self.val_loss.reset()
            return
        value = self.val_loss.compute()
        self.val_loss.reset()
        if not bool(torch.isfinite(value)):
            raise NonFiniteError(f"held-out loss at step {self.global_step} is {float(value)}: the weights hold "
                                 f"NaN/Inf (lower optim.lr or set optim.grad_clip); nothing from this step is usable")
        self.log("val/loss", value, sync_dist=False, rank_zero_only=False)

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Stop on a NaN/Inf gradient, naming the step and this rank's samples. Under FSDP each rank
        holds a shard of the gradient, so the verdict is reduced over ranks (everyone stops together)."""
        if self.trainer.precision == "16-mixed":
            return  # the GradScaler skips such steps by design
        grads = [p.grad for p in self.parameters() if p.requires_grad and p.grad is not None]
        finite = not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        if self.sharded and self.trainer.world_size > 1:
            finite = bool(self.trainer.strategy.reduce_boolean_decision(finite, all=True))
        if finite:
            return
        keys = ", ".join(k for k in self._batch_keys[:16] if k) or "(placeholders only)"
        raise NonFiniteError(
            f"non-finite gradient at optimizer step {self.global_step} (rank {self.global_rank} trained on samples "
            f"{keys}). Lower optim.lr, keep optim.grad_clip set, or check those samples.")

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Without FSDP: keep the trainable weights (and buffers) only - the frozen base is reloaded
        from ``mllm.path`` - so a LoRA checkpoint of a 13B model is ~1 GB, not ~26 GB."""
        if self._trainer is not None:  # what an offline export needs to describe the recipe
            checkpoint["img_finetune"] = {"accumulate_grad_batches": int(self.trainer.accumulate_grad_batches),
                                          "world_size": int(self.trainer.world_size)}
        if self.sharded or "state_dict" not in checkpoint:
            return
        frozen = {f"{n}" for n, p in self.named_parameters() if not p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.sharded or self.model is None or "state_dict" not in checkpoint:
            return
        missing = [n for n, p in self.named_parameters() if p.requires_grad and n not in checkpoint["state_dict"]]
        if missing:
            from ..errors import UserError

            raise UserError(f"the checkpoint lacks {len(missing)} trainable weights (e.g. {missing[0]}): it was "
                            f"made with another finetune.method or model; start a new run (another run.name)")

    # ------------------------------------------------------------------ optimisation
    def param_groups(self) -> list[dict[str, Any]]:
        """``lm`` at ``optim.lr``, ``projector`` at ``optim.projector_lr`` (default: lr); with weight
        decay > 0, biases and norm weights (1-D) go to ``*_no_decay`` groups."""
        cfg = self.optim_cfg
        wd = float(cfg.weight_decay)
        groups: dict[str, dict[str, Any]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            part = "projector" if is_projector_parameter(name) else "lm"
            lr = float(cfg.projector_lr if part == "projector" and cfg.projector_lr is not None else cfg.lr)
            decay = wd > 0 and param.ndim >= 2
            label = part if decay or wd == 0 else f"{part}_no_decay"
            group = groups.setdefault(label, {"name": label, "params": [], "lr": lr,
                                              "weight_decay": wd if decay else 0.0})
            group["params"].append(param)
        if not groups:
            raise ValueError("nothing to train: every parameter is frozen (check finetune.train_projector / method)")
        return list(groups.values())

    def configure_gradient_clipping(self, optimizer: Optimizer, gradient_clip_val: Optional[float] = None,
                                    gradient_clip_algorithm: Optional[str] = None) -> None:
        """Global-norm clipping. Under FSDP each rank holds a shard of the gradient, so the norm must
        be FSDP's own (``clip_grad_norm_`` of the root module, which all-reduces the shards' norms);
        Lightning's FSDP precision plugin refuses norm clipping, hence this hook."""
        if not gradient_clip_val:
            return
        if self.sharded:
            root = cast("FullyShardedDataParallel", self.trainer.strategy.model)
            root.clip_grad_norm_(float(gradient_clip_val))
        else:
            self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                                gradient_clip_algorithm=gradient_clip_algorithm)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        from ..module import build_scheduler

        cfg = self.optim_cfg
        # fused AdamW on GPUs; not over FSDP's views of flat parameters (a rank's view may be empty)
        fused = self.device.type == "cuda" and not self.sharded
        beta1, beta2 = cfg.betas  # two, checked when the config loads
        optimizer = torch.optim.AdamW(self.param_groups(), betas=(beta1, beta2), eps=float(cfg.eps), fused=fused)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = math.ceil(float(cfg.warmup_ratio) * total)
        scheduler = build_scheduler(optimizer, str(getattr(cfg.schedule, "value", cfg.schedule)), warmup, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def batch_seed(seed: int, rank: int, epoch: int, position: int) -> int:
    """A 63-bit torch seed for one micro-batch (numpy's SeedSequence mixes the four numbers)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, rank, epoch, position]).generate_state(2, np.uint64)[0] >> np.uint64(1))
