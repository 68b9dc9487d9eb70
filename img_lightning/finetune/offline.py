"""``img-finetune-mllm export``: the export of a checkpoint, outside of training (one process).

For a run trained with ``run.export=false``, or to export an earlier checkpoint. A checkpoint file
(DDP, LoRA: the trainable weights only; the base is read from ``mllm.path``) is read with
``weights_only=True``; an FSDP sharded checkpoint directory is read with
``torch.distributed.checkpoint`` into the full model in this process (host memory: the model in
float32, ~53 GB for 13B).

The manifest describes the run as it was trained, not the config given now: it is built from the
config saved in the checkpoint (:class:`~.provenance.RunRecord`; the run's ``config.yaml`` for
checkpoints made before it), with only the locations (``mllm.path``, ``data.input``) taken from
the command. An override that would change what the manifest records (``data.heldout_fraction``:
``eval`` would then score training samples as held out) is refused, as are data with another
fingerprint and a base model with other weights than the checkpoint's.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, cast

import torch
from omegaconf import OmegaConf

from ..config.changes import config_changes, describe_changes
from ..config.finetune_mllm import FinetuneMLLMConfig, resume_free_keys
from ..config.loading import ConfigError, load_config, to_container
from ..config.node import as_node
from ..errors import UserError
from ..run_dir import CONFIG_NAME, resolve_resume, run_directory
from ..run_lock import holding_run_directory

if TYPE_CHECKING:  # imported where used: the command starts without loading the model stack
    from .module import MLLMFinetuneModule

log = logging.getLogger(__name__)
# where the run and the base live, and how this export is written: free to differ from the training config
EXPORT_FREE_KEYS = frozenset({"run.root", "run.name", "mllm.device", "mllm.batch_size"})


def trained_config(cfg: FinetuneMLLMConfig, checkpoint: dict[str, Any], run_dir: Path,
                   what: str) -> FinetuneMLLMConfig:
    """The config ``checkpoint`` was trained with, with this command's locations; refuses a ``cfg``
    that differs from it in a key the export records."""
    from .provenance import saved_record

    saved = saved_record(checkpoint).get("config")
    source = "the config saved in the checkpoint"
    if saved is None:
        if not (run_dir / CONFIG_NAME).is_file():
            raise UserError(f"{what} does not say what it was trained with (made before checkpoints recorded their "
                            f"config) and {run_dir / CONFIG_NAME} is missing: export it with its run's config")
        saved = to_container(load_config(FinetuneMLLMConfig, [run_dir / CONFIG_NAME], require_complete=False))
        source = f"the run's {CONFIG_NAME}"
    trained = cast(FinetuneMLLMConfig, OmegaConf.merge(OmegaConf.structured(FinetuneMLLMConfig), saved))
    changes = config_changes(to_container(trained), to_container(cfg))
    free = resume_free_keys(trained) | EXPORT_FREE_KEYS
    refused = [k for k in changes if k not in free]
    if refused:
        raise ConfigError(f"cannot export {what}: the config differs from {source} in keys the export records, so "
                          f"its manifest would describe another run:\n{describe_changes(changes, refused)}\n"
                          f"Drop these overrides: the export describes the run as it was trained.")
    for key in ("mllm.path", "data.input"):  # locations: where the base and the data are now
        OmegaConf.update(as_node(trained), key, OmegaConf.select(as_node(cfg), key), merge=False)
    return trained


def _load(module: MLLMFinetuneModule, path: Path) -> dict[str, Any]:
    from .export import load_sharded_checkpoint

    if path.is_dir():
        return load_sharded_checkpoint(module, path)
    meta = torch.load(path, map_location="cpu", weights_only=True)
    module.on_load_checkpoint(meta)  # every trainable weight must be there
    missing, unexpected = module.load_state_dict(meta["state_dict"], strict=False)
    if unexpected:
        raise UserError(f"{path} holds weights this model does not have (e.g. {unexpected[0]}); it was made "
                        f"with another mllm/finetune config")
    return meta


def export_checkpoint(cfg: FinetuneMLLMConfig, checkpoint: Optional[str] = None, out: Optional[str] = None) -> Path:
    from ..job import apply_torch_threads

    apply_torch_threads(cfg.run.torch_threads)
    run_dir = run_directory(cfg.run)
    path = checkpoint or resolve_resume(run_dir, "last")
    if not path or not Path(path).exists():
        raise UserError(f"no checkpoint to export: {run_dir}/checkpoints holds none (give --checkpoint PATH)")
    target = Path(out) if out else run_dir / "export"
    in_run = target.resolve().is_relative_to(run_dir.resolve())
    with holding_run_directory(run_dir, "img-finetune-mllm export") if in_run else contextlib.nullcontext():
        return _export(cfg, Path(path), run_dir, target)


def _export(cfg: FinetuneMLLMConfig, path: Path, run_dir: Path, target: Path) -> Path:
    from transformers import AutoProcessor

    from ..encoders.mllm import mllm_folder
    from ..models import resolve_device
    from .datamodule import EditTripletDataModule
    from .export import export_model
    from .merge import is_lora
    from .module import MLLMFinetuneModule
    from .provenance import OtherBaseModel, base_identity, base_mismatch, saved_record
    from .training import export_manifest

    sharded = path.is_dir()
    module = MLLMFinetuneModule(cfg.mllm, cfg.finetune, cfg.optim, strategy="fsdp" if sharded else "ddp",
                                seed=cfg.run.seed)
    module.configure_model()
    meta = _load(module, path)
    trained = trained_config(cfg, meta, run_dir, str(path))
    base = base_identity(cfg.mllm)
    problem = base_mismatch(saved_record(meta).get("base"), base, str(path))
    if problem:
        raise OtherBaseModel(problem)
    datamodule = EditTripletDataModule(trained.data, trained.mllm)
    datamodule.setup()
    index = datamodule.index
    assert index is not None  # set up
    state = meta.get("EditTripletDataModule", {})
    if state.get("fingerprint") not in (None, index.fingerprint):
        raise UserError(f"data.input={cfg.data.input} is not the data {path} was trained on (index fingerprint "
                        f"{index.fingerprint[:12]}..., the checkpoint's {state['fingerprint'][:12]}...): "
                        f"the manifest's split would not be the training split. Point data.input at that data")
    datamodule.counts.restore(state)
    world = int(state.get("world_size") or 1)
    info = meta.get("img_finetune", {})
    manifest = export_manifest(trained, datamodule, int(meta.get("global_step", 0)), world,
                               int(info.get("accumulate_grad_batches", 1)), {})
    manifest["base"]["weights_sha256"] = base["sha256"]
    manifest["training"]["checkpoint"] = str(path)
    processor = AutoProcessor.from_pretrained(mllm_folder(cfg.mllm, key="mllm"))
    model = module.model
    assert model is not None  # configured above
    if is_lora(model):  # the merge check runs two forwards: on mllm.device (a GPU when there is one)
        model.to(resolve_device(str(cfg.mllm.device)))
    return export_model(model, processor, target, manifest, dtype=str(cfg.run.export_dtype),
                        check_batch=datamodule.check_batch())
