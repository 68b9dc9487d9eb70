"""Merge LoRA adapters into the base weights for the export, and measure what the merge changed.

The frozen base is held in ``mllm.dtype`` (bf16 in the LoRA recipes) while the adapters train in
float32. Adding the float32 update ``B @ A * scale`` to bf16 weights in place (what PEFT's
``merge_and_unload`` does) rounds the sum to bf16, whose 8-bit mantissa keeps little of an update
that is ~1 % of the weight, and no export dtype brings it back. Here each adapted
layer's base weight is upcast to float32, the update added, and the sum rounded *once* to the
export dtype - one layer at a time, so the peak memory is the model plus one layer in float32.

:func:`merge_for_export` also runs one batch (a held-out batch when the caller has one) through
the model before and after the merge and reports the largest change of the logits: the manifest
records it, so a user can see the exported weights compute what the trained adapters did.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any, Optional

import torch
from torch import nn

from ..errors import UserError
from .model import HFModel, inner
from .module import MODEL_INPUTS
from .samples import IGNORE

log = logging.getLogger(__name__)
PROBE_TEXT = ("A chat between a curious human and an artificial intelligence assistant. USER: What must change "
              "in this image so that it shows a red square on a blue background? ASSISTANT: make the square red")


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def merge_lora(model: HFModel, dtype: torch.dtype) -> HFModel:
    """The plain transformers model of a PEFT LoRA ``model``: every adapted weight becomes
    ``round_dtype(float32(base) + delta)``; layers without adapters are left as they are."""
    from peft.tuners.lora import LoraLayer

    for layer in model.modules():
        if not isinstance(layer, LoraLayer):
            continue
        if getattr(layer, "lora_variant", None) or any(getattr(layer, "lora_bias", {}).values()):
            raise UserError("the export merges plain LoRA adapters only (no DoRA or other variant, no LoRA bias)")
        base = layer.get_base_layer()
        merged = base.weight.detach().float()
        for name in layer.active_adapters:
            if name in layer.lora_A:
                merged += layer.get_delta_weight(name).float()
        base.weight.data = merged.to(dtype)
        del merged
    return model.unload()


def adapted_parameters(model: nn.Module) -> set[int]:
    """``id`` of every LoRA base weight and adapter matrix (what the merge reads in float32)."""
    from peft.tuners.lora import LoraLayer

    out: set[int] = set()
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            out.add(id(layer.get_base_layer().weight))
            out.update(id(p) for p in layer.lora_A.parameters())
            out.update(id(p) for p in layer.lora_B.parameters())
    return out


def cast_parameters(model: nn.Module, dtype: torch.dtype, keep: frozenset[int] | set[int] = frozenset()) -> None:
    """Cast the floating parameters in place, except those whose ``id`` is in ``keep``. Buffers
    (rotary frequencies) stay as they are: they are not exported and both forwards share them."""
    for param in model.parameters():
        if param.is_floating_point() and id(param) not in keep:
            param.data = param.data.to(dtype)


def _vision_dtype(core: nn.Module) -> Optional[torch.dtype]:
    tower = getattr(core.model, "vision_tower", None) or getattr(core.model, "visual", None)
    param = next(tower.parameters(), None) if tower is not None else None
    return param.dtype if param is not None else None


def check_logits(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """float32 logits where ``batch`` has answer labels (all attended positions without any):
    the positions the finetune trained, without the full sequence x vocabulary logits."""
    core = inner(model)
    device = next(model.parameters()).device
    inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(_vision_dtype(core) or torch.float32)
    hidden = core.model(**inputs, use_cache=False, return_dict=True).last_hidden_state
    labels = batch.get("labels")
    if labels is not None and bool((labels[:, 1:] != IGNORE).any()):
        rows = hidden[:, :-1][(labels[:, 1:] != IGNORE).to(device)]
    else:
        rows = hidden[inputs["attention_mask"].bool()]
    return core.lm_head(rows).float()


def probe_batch(processor: Any) -> dict[str, torch.Tensor]:
    """A text-only input, for when no held-out batch is given: it still runs every adapted layer."""
    tokenizer = getattr(processor, "tokenizer", processor)
    return dict(tokenizer([PROBE_TEXT], return_tensors="pt"))


def merge_for_export(model: nn.Module, dtype: torch.dtype, batch: Optional[Mapping[str, Any]] = None,
                     processor: Any = None) -> tuple[nn.Module, dict[str, Any]]:
    """Merge ``model``'s adapters (:func:`merge_lora`), cast the whole model to ``dtype`` (what is
    written), and compare its logits on ``batch`` (else a text probe) with the unmerged model's.

    Every weight without an adapter (tower, embeddings, norms, projector) is cast to ``dtype``
    first, as the export casts it anyway, and both forwards run under autocast to ``dtype`` (for
    float32: no autocast, everything cast to float32 first), so the difference measures the merge
    of the adapted weights, not another compute precision. Returns the plain model and the check
    for the manifest."""
    source = "held-out batch" if batch is not None else "text-only probe (no held-out batch was given)"
    if batch is None:
        batch = probe_batch(processor)
    model.eval()  # no dropout in either forward
    device = next(model.parameters()).device
    if dtype == torch.float32:
        cast_parameters(model, dtype)  # the export is float32: its size, with the reference in it too
        autocast: Any = nullcontext()
    else:  # a bf16 base under float16 autocast cannot mix the two half types: all but the adapted in dtype
        cast_parameters(model, dtype, keep=adapted_parameters(model))
        autocast = torch.autocast(device_type=device.type, dtype=dtype)
    with torch.no_grad(), autocast:
        reference = check_logits(model, batch)
    plain = merge_lora(model, dtype)
    with torch.no_grad(), autocast:
        merged = check_logits(plain, batch)
    rows = int(reference.shape[0])
    check: dict[str, Any] = {"input": source, "samples": int(batch["input_ids"].shape[0]), "positions": rows,
                             "dtype": str(dtype).removeprefix("torch.")}
    if not (bool(torch.isfinite(reference).all()) and bool(torch.isfinite(merged).all())):
        # The weights are checked finite when written; a float16 *forward* can overflow where the
        # weights do not (Qwen's activations), which says nothing about the merge.
        check["note"] = f"the {check['dtype']} forward overflowed (before or after the merge): no comparison"
        log.warning("LoRA merge check: %s; the exported weights are finite, but read them in bfloat16 or float32",
                    check["note"])
        return plain, check
    diff = (merged - reference).abs()
    check.update({
        "max_abs_logit_diff": float(diff.max()) if rows else 0.0,
        "mean_abs_logit_diff": float(diff.mean()) if rows else 0.0,
        "max_abs_logit": float(reference.abs().max()) if rows else 0.0,
        "top1_agreement": float((merged.argmax(-1) == reference.argmax(-1)).float().mean()) if rows else 1.0,
    })
    log.info("LoRA merged into %s weights; on the %s, max |merged - unmerged| logit %.3g (max |logit| %.3g), "
             "top-1 agreement %.4f", check["dtype"], source, check["max_abs_logit_diff"], check["max_abs_logit"],
             check["top1_agreement"])
    return plain, check
