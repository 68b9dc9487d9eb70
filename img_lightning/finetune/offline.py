"""``img-finetune-mllm export``: the export of a checkpoint, outside of training (one process).

For a run trained with ``run.export=false``, or to export an earlier checkpoint. A checkpoint file
(DDP, LoRA: the trainable weights only; the base is read from ``mllm.path``) is read with
``weights_only=True``; an FSDP sharded checkpoint directory is read with
``torch.distributed.checkpoint`` into the full model in this process (host memory: the model in
float32, ~53 GB for 13B).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import UserError
from ..run_dir import resolve_resume, run_directory

log = logging.getLogger(__name__)


def export_checkpoint(cfg: Any, checkpoint: Optional[str] = None, out: Optional[str] = None) -> Path:
    from transformers import AutoProcessor

    from ..encoders.mllm import mllm_folder
    from ..models import resolve_device
    from .datamodule import EditTripletDataModule
    from .export import export_model, load_sharded_checkpoint
    from .merge import is_lora
    from .module import MLLMFinetuneModule
    from ..training import apply_torch_threads
    from .training import export_manifest

    apply_torch_threads(cfg.run.torch_threads)
    run_dir = run_directory(cfg.run)
    path = checkpoint or resolve_resume(run_dir, "last")
    if not path or not Path(path).exists():
        raise UserError(f"no checkpoint to export: {run_dir}/checkpoints holds none (give --checkpoint PATH)")
    path = Path(path)
    sharded = path.is_dir()
    module = MLLMFinetuneModule(cfg.mllm, cfg.finetune, cfg.optim, strategy="fsdp" if sharded else "ddp",
                                seed=cfg.run.seed)
    module.configure_model()
    if sharded:
        meta = load_sharded_checkpoint(module, path)
    else:
        meta = torch.load(path, map_location="cpu", weights_only=True)
        module.on_load_checkpoint(meta)  # every trainable weight must be there
        missing, unexpected = module.load_state_dict(meta["state_dict"], strict=False)
        if unexpected:
            raise UserError(f"{path} holds weights this model does not have (e.g. {unexpected[0]}); it was made "
                            f"with another mllm/finetune config")
    datamodule = EditTripletDataModule(cfg.data, cfg.mllm)
    datamodule.setup()
    state = meta.get("EditTripletDataModule", {})
    world = int(state.get("world_size") or 1)
    info = meta.get("img_finetune", {})
    manifest = export_manifest(cfg, datamodule, int(meta.get("global_step", 0)), world,
                               int(info.get("accumulate_grad_batches", 1)), {})
    manifest["training"]["checkpoint"] = str(path)
    target = Path(out) if out else run_dir / "export"
    processor = AutoProcessor.from_pretrained(mllm_folder(cfg.mllm, key="mllm"))
    if is_lora(module.model):  # the merge check runs two forwards: on mllm.device (a GPU when there is one)
        module.model.to(resolve_device(str(cfg.mllm.device)))
    return export_model(module.model, processor, target, manifest, dtype=str(cfg.run.export_dtype),
                        check_batch=datamodule.check_batch())
