"""The distributed strategy of a finetuning run.

* ``full`` + ``trainer.strategy: fsdp`` (the 13B recipe): Lightning's ``FSDPStrategy`` with the
  language model's decoder layers (and the vision tower's blocks) as auto-wrap units, the chosen
  sharding (FULL_SHARD: parameters, gradients and AdamW states split over all ranks), activation
  checkpointing of every decoder layer, bf16 compute over float32 shards (``bf16-mixed``) and
  sharded checkpoints (each rank writes its own shard; no rank ever gathers 13B parameters to save).
* ``lora`` (or a model that fits per GPU): DDP; the frozen base is replicated in ``mllm.dtype``,
  only adapters and projector are all-reduced; gradient checkpointing via transformers.

The layer classes are read from the model itself (built on the meta device from its config, no
weights), so a llava-hf folder around another language model gets that model's layer class.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config.encoders import MLLMConfig
from ..config.finetune_mllm import FinetuneMLLMConfig

if TYPE_CHECKING:  # imported where used: FSDP's modules load slowly
    from lightning.pytorch.strategies import FSDPStrategy, Strategy


def layer_classes(mllm_cfg: MLLMConfig) -> tuple[set[type[nn.Module]], set[type[nn.Module]]]:
    """``(decoder layer classes, vision block classes)`` of the configured MLLM, from its config."""
    import transformers
    from transformers import AutoConfig

    from ..encoders.mllm import BACKENDS, mllm_folder
    from .model import decoder_layer_classes, vision_layer_classes

    backend = str(mllm_cfg.backend)
    config = AutoConfig.from_pretrained(mllm_folder(mllm_cfg, key="mllm"))
    with torch.device("meta"):
        skeleton = getattr(transformers, BACKENDS[backend][0])._from_config(config)
    return decoder_layer_classes(skeleton), vision_layer_classes(skeleton, backend)


def build_strategy(cfg: FinetuneMLLMConfig) -> str | Strategy:
    """The Lightning strategy for ``cfg`` (a string for Lightning's defaults, else a strategy object)."""
    kind = str(getattr(cfg.trainer.strategy, "value", cfg.trainer.strategy))
    if kind == "fsdp":
        return fsdp_strategy(cfg)
    if kind == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # Every trainable weight gets a gradient every step (frozen ones are not tracked by DDP).
        return DDPStrategy(find_unused_parameters=False)
    return "auto"


def fsdp_strategy(cfg: FinetuneMLLMConfig) -> FSDPStrategy:
    method = str(getattr(cfg.finetune.method, "value", cfg.finetune.method))
    if method != "full":
        raise ValueError(f"trainer.strategy=fsdp is for finetune.method=full (got {method}); LoRA runs under ddp")
    decoder, vision = layer_classes(cfg.mllm)
    f = cfg.fsdp
    return atomic_fsdp_class()(
        auto_wrap_policy=decoder | vision,
        activation_checkpointing_policy=decoder if cfg.finetune.gradient_checkpointing else None,
        # Our Choices' values are Lightning's names (a str where it declares their Literal).
        sharding_strategy=str(getattr(f.sharding_strategy, "value", f.sharding_strategy)),  # type: ignore[arg-type]
        state_dict_type=str(getattr(f.state_dict_type, "value", f.state_dict_type)),  # type: ignore[arg-type]
        cpu_offload=bool(f.cpu_offload),
        limit_all_gathers=bool(f.limit_all_gathers),
        use_orig_params=True,  # frozen tower + trainable parts, named param groups
    )


def atomic_fsdp_class() -> type[FSDPStrategy]:
    """Lightning's ``FSDPStrategy`` whose sharded checkpoints replace the previous one only when
    complete: every rank writes its shard into a hidden staging directory beside the target, then
    rank 0 swaps it in (:func:`~img_lightning.checkpoint_io.replace_directory`). Lightning writes
    into the existing ``last.ckpt`` directory in place, so a full disk or a kill mid-save left a
    mix of two steps. A full disk names the run directory's file system. (A ``full`` state dict
    goes through the trainer's :class:`~img_lightning.checkpoint_io.AtomicCheckpointIO`.)"""
    from lightning.pytorch.strategies import FSDPStrategy

    from ..checkpoint_files import staging_name
    from ..checkpoint_io import replace_directory, reporting_full_disk

    class AtomicFSDPStrategy(FSDPStrategy):
        def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
            if self._state_dict_type != "sharded":
                return super().save_checkpoint(checkpoint, filepath, storage_options)
            target = Path(self.broadcast(str(filepath)))
            staged = staging_name(target)
            if self.global_rank == 0 and staged.exists():
                shutil.rmtree(staged)
            self.barrier("img_checkpoint_staging")
            with reporting_full_disk(target):
                super().save_checkpoint(checkpoint, staged, storage_options)
            self.barrier("img_checkpoint_written")
            if self.global_rank == 0:
                replace_directory(staged, target)
            self.barrier("img_checkpoint_replaced")

    return AtomicFSDPStrategy
