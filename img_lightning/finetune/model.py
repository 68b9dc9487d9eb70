"""The trainable MLLM: which parts train (LLaVA-1.5's finetune recipe), LoRA, dtypes, layer classes.

LLaVA-1.5 finetunes with the vision tower frozen and the projector and the whole language model
(embeddings, decoder layers, norm, ``lm_head``) trained; its LoRA variant puts adapters on every
linear layer of the language model and trains the projector fully at its own lr. Qwen2.5-VL maps
onto the same parts: ``visual`` minus its ``merger`` is the tower, ``visual.merger`` the projector.

dtypes: trainable weights are float32 (AdamW's master weights; compute runs in bf16 under
``bf16-mixed``); frozen weights stay in ``mllm.dtype`` - except under FSDP, whose flat parameters
need one dtype per wrapped unit, where everything is float32 and FSDP computes in bf16.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..config.encoders import MLLMConfig
from ..config.finetune_mllm import FinetuneMethodConfig

# backend -> (vision tower path, projector path) inside the transformers model's ``.model``
PARTS = {
    "llava": ("vision_tower", "multi_modal_projector"),
    "qwen2_5_vl": ("visual", "visual.merger"),
}
PROJECTOR_NAMES = ("multi_modal_projector", "visual.merger")

# A transformers model, or a PEFT model around one. Any: transformers and peft are read as untyped
# (pyproject.toml), and what is used of them (``config``, ``save_pretrained``, ``generate``, ``unload``,
# submodules by name) is not ``nn.Module``'s.
HFModel = Any


def _get(module: object, dotted: str) -> Any:
    """The attribute at a dotted path (transformers models are navigated by name)."""
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def inner(model: nn.Module) -> HFModel:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    if hasattr(model, "peft_config"):  # peft.PeftModel -> LoraModel -> the transformers model
        return _get(model, "base_model.model")
    return model


def vision_tower(model: nn.Module, backend: str) -> nn.Module:
    return _get(inner(model).model, PARTS[backend][0])


def projector(model: nn.Module, backend: str) -> nn.Module:
    return _get(inner(model).model, PARTS[backend][1])


def decoder_layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The language model's decoder layer class (FSDP wrap unit, activation checkpointing unit)."""
    return {type(inner(model).model.language_model.layers[0])}


def vision_layer_classes(model: nn.Module, backend: str) -> set[type[nn.Module]]:
    """The vision tower's block class (wrapped too, so the frozen tower is sharded, not replicated)."""
    tower = vision_tower(model, backend)
    if backend == "qwen2_5_vl":
        blocks = _get(tower, "blocks")
    else:  # CLIPVisionModel: transformers 5 flattened it (encoder.layers), 4.x nested it in vision_model
        blocks = _get(getattr(tower, "vision_model", tower), "encoder.layers")
    return {type(blocks[0])}


def lora_target_regex(target_modules: list[str]) -> str:
    """PEFT target: the named linear layers of the *language model* only (the vision towers have
    layers of the same names, which LLaVA's recipe leaves frozen)."""
    names = "|".join(sorted(set(target_modules)))
    return rf".*language_model\..*\.({names})$"


def trainable_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


def is_projector_parameter(name: str) -> bool:
    return any(p in name for p in PROJECTOR_NAMES)


def build_trainable_model(mllm_cfg: MLLMConfig, ft_cfg: FinetuneMethodConfig, sharded: bool,
                          seed: int = 42) -> nn.Module:
    """Load the base MLLM (CPU), freeze and wrap it per ``finetune``; ``sharded``: FSDP will wrap it."""
    from ..encoders.mllm import load_mllm_model, mllm_folder
    from ..models import resolve_dtype

    method = str(getattr(ft_cfg.method, "value", ft_cfg.method))
    if sharded and method == "lora":
        raise ValueError("finetune.method=lora runs under DDP (trainer.strategy=ddp or auto); "
                         "FSDP is for the full finetune")
    backend = str(mllm_cfg.backend)
    dtype = torch.float32 if sharded else resolve_dtype(str(mllm_cfg.dtype))
    model = load_mllm_model(mllm_cfg, mllm_folder(mllm_cfg, key="mllm"), dtype)
    model.config.use_cache = False
    model.requires_grad_(method == "full")
    vision_tower(model, backend).requires_grad_(False)
    projector(model, backend).requires_grad_(bool(ft_cfg.train_projector))
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = ft_cfg.lora
        config = LoraConfig(r=int(lora.r), lora_alpha=float(lora.alpha), lora_dropout=float(lora.dropout),
                            target_modules=lora_target_regex(list(lora.target_modules)), bias="none")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # LoRA's A matrices: the same on every rank, from run.seed
            model = get_peft_model(model, config)
        projector(model, backend).requires_grad_(bool(ft_cfg.train_projector))  # PEFT froze everything else
    for _, param in trainable_named_parameters(model):
        param.data = param.data.float()
    # from_pretrained returns eval mode and Lightning keeps each module's mode: dropout (LoRA's)
    # must be on while training; the frozen tower stays in eval mode.
    model.train()
    vision_tower(model, backend).eval()
    if bool(ft_cfg.gradient_checkpointing) and not sharded:
        # FSDP checkpoints the decoder layers through the strategy instead (see strategy.py).
        core = inner(model)
        if hasattr(core, "activation_checkpointing_enable"):  # transformers >= 5.2x's name
            core.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            core.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


