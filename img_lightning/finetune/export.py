"""Export a finetuned MLLM as a folder ``img-preprocess`` loads directly (``encoders.mllm.path``).

The folder is what transformers' ``save_pretrained`` writes for the model class (llava-hf
``LlavaForConditionalGeneration`` or ``Qwen2_5_VLForConditionalGeneration``: ``config.json``,
safetensors shards, ``generation_config.json``) plus the base model's processor, and the manifest
``img_finetune.json`` (:mod:`.manifest`) with the sha256 of every weight file. It is written into
a hidden temporary folder and renamed when complete, so a reader never sees half an export.

A LoRA model is merged here, where the export dtype is known (:mod:`.merge`: float32 sums rounded
once to ``dtype``), and the manifest's ``merge_check`` records how much the merge changed the
logits of one batch. A weight that is not finite in ``dtype`` (float16 overflows above 65504) is
refused, never written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch

from ..encoders.export_manifest import MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION
from ..errors import NonFiniteError
from ..hashing import file_sha256
from ..models import resolve_dtype
from .merge import is_lora, merge_for_export
from .model import HFModel


def export_model(model: HFModel, processor: Any, out_dir: str | Path, manifest: Mapping[str, Any],
                 dtype: str = "float16", state_dict: Optional[Mapping[str, torch.Tensor]] = None,
                 check_batch: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``model`` (a transformers model, or a PEFT LoRA one, merged here) with ``processor``
    and the manifest into ``out_dir``. ``state_dict``: the full weights when the model's own are
    sharded (FSDP gathers them on rank 0). ``check_batch``: the held-out batch the LoRA merge is
    checked on (default: a text probe). Returns ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    target = resolve_dtype(dtype)
    extra: dict[str, Any] = {}
    if is_lora(model):
        model, extra["merge_check"] = merge_for_export(model, target, check_batch, processor)
    source = state_dict if state_dict is not None else model.state_dict()
    weights = {k: (v.detach().to(target) if v.is_floating_point() else v.detach()) for k, v in source.items()}
    check_finite(weights, dtype)
    config = model.config
    use_cache = getattr(config, "use_cache", None)
    try:
        config.use_cache = True  # training turned it off; generation and feature extraction want it
        config.dtype = target
        text_config = getattr(config, "text_config", None)
        if text_config is not None:
            text_config.use_cache = True
        model.save_pretrained(tmp, state_dict=weights, safe_serialization=True, max_shard_size="5GB")
        processor.save_pretrained(tmp)
        files = sorted(p.name for p in tmp.glob("*.safetensors"))
        full = {**manifest, **extra, "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "dtype": dtype,
                "weights": {name: file_sha256(tmp / name) for name in files},
                "weight_sizes": {name: (tmp / name).stat().st_size for name in files}}
        (tmp / MANIFEST_NAME).write_text(json.dumps(full, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        config.use_cache = use_cache
    return out_dir


def check_finite(weights: Mapping[str, torch.Tensor], dtype: str) -> None:
    """Refuse a weight with NaN/Inf (a float16 export overflows above 65504), naming it."""
    for name, value in weights.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise NonFiniteError(f"the exported weight {name} is not finite in {dtype}: export with "
                                 f"run.export_dtype=float32 (or bfloat16, float32's range at less precision)")


def plain_model(config: Any, backend: str, state: Mapping[str, torch.Tensor]) -> HFModel:
    """A plain transformers model of ``backend`` holding ``state`` (built on the meta device, the
    tensors assigned, not copied): what FSDP's gathered weights are saved from, instead of the
    wrapped training module."""
    import transformers

    from ..encoders.mllm import BACKENDS

    with torch.device("meta"):
        model = getattr(transformers, BACKENDS[backend][0])._from_config(config)
    missing, unexpected = model.load_state_dict(dict(state), strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"the gathered weights do not fit {BACKENDS[backend][0]}: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    return model


def full_state_dict_fsdp(fsdp_module: torch.nn.Module, prefix: str = "model.") -> Optional[dict[str, torch.Tensor]]:
    """Gather the full weights of an FSDP-wrapped LightningModule onto rank 0's CPU (every rank
    must call this; others get None). Keys lose the LightningModule's ``prefix``."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(fsdp_module, StateDictType.FULL_STATE_DICT,
                              FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
        state = fsdp_module.state_dict()
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_sharded_checkpoint(module: torch.nn.Module, path: str | Path) -> dict[str, Any]:
    """Load the model weights of a Lightning FSDP *sharded* checkpoint directory into an unwrapped
    module in one process (``torch.distributed.checkpoint`` reshards); returns the metadata
    (``meta.pt``, read with ``weights_only``)."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    state = {"model": module.state_dict()}
    dcp.load(state, checkpoint_id=str(path))
    module.load_state_dict(state["model"], strict=True)
    meta = path / "meta.pt"
    return torch.load(meta, map_location="cpu", weights_only=True) if meta.is_file() else {}
