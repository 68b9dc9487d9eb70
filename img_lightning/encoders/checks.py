"""Is every encoder model there, and how wide are its features? Answered without loading weights.

``img-eval`` asks before its first image (preprocessing and the grader scorer ask the same of their
MLLM): a missing folder, a download without weights, a model of the wrong family or an original
LLaVA-repository folder is reported with the config key to fix, and the widths the aligner must
fit are read from the config files and tensor headers alone. Each check records what is wrong in
a :class:`~img_lightning.errors.Problems` and returns ``None`` for what it could not determine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..config.encoders import IPEncoderConfig, MLLMConfig
from ..errors import Problems
from ..models import ModelNotFoundError, check_model, find_in
from .export_manifest import verify_export_weights

# The image projection's last LayerNorm: its width is the IP tokens' width (h94 "plus" resampler,
# h94's plain ImageProjModel, XLabs' FLUX ImageProjModel).
_TOKEN_NORMS = ("image_proj.norm_out.weight", "image_proj.norm.weight", "ip_adapter_proj_model.norm.weight")
# The adapter's key projections: their input width is the width of the tokens the denoiser reads.
_KEY_PROJECTIONS = ("to_k_ip.weight", "ip_adapter_double_stream_k_proj.weight")


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of an adapter file, from the safetensors header (or a memory-mapped
    ``weights_only`` torch file): no weights are read."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {f"{group}.{k}": tuple(v.shape) for group, sub in state.items() if isinstance(sub, dict)
            for k, v in sub.items()}


def adapter_widths(path: str | Path) -> dict[str, Optional[int]]:
    """``{"tokens": width of the projection's output, "attention": input width of the key
    projections}`` of an original IP-Adapter file; ``None`` where the file has no such tensor."""
    try:
        shapes = _tensor_shapes(Path(path))
    except Exception as err:  # noqa: BLE001 - foreign or damaged bytes: say which file
        raise ModelNotFoundError(f"{path}: not a readable IP-Adapter file ({type(err).__name__}: {err})") from None
    tokens = next((shapes[k][0] for k in _TOKEN_NORMS if k in shapes), None)
    attention = next((s[1] for k, s in sorted(shapes.items()) if k.endswith(_KEY_PROJECTIONS) and len(s) == 2), None)
    return {"tokens": tokens, "attention": attention}


def adapter_file(what: str, model_id: str, path: Optional[str], subfolder: str, weight_name: str, key: str,
                 revision: Optional[str] = None) -> Path:
    """The adapter file ``model_id``/``path`` + ``subfolder/weight_name`` (``path`` may be the file)."""
    wanted = f"{subfolder.strip('/')}/{weight_name}" if subfolder else weight_name
    root = check_model(what, model_id, path, key, revision=revision, marker=None, weights=False, files=[wanted])
    return root if root.is_file() else find_in(root, subfolder or "", weight_name, model_id, key)


def check_ip_encoder(cfg: IPEncoderConfig, problems: Problems, key: str = "encoders.ip") -> Optional[int]:
    """The IP encoder's CLIP tower and adapter file are there; returns its token width."""
    problems.check(check_model, "IP image encoder (CLIP vision tower)", cfg.image_encoder, cfg.image_encoder_path,
                   f"{key}.image_encoder_path", revision=cfg.revision, subfolder=cfg.image_encoder_subfolder)
    file = problems.check(adapter_file, "IP-Adapter of the IP encoder", cfg.adapter, cfg.adapter_path,
                          cfg.adapter_subfolder, cfg.adapter_weight_name, f"{key}.adapter_path", cfg.revision)
    if file is None:
        return None
    widths = problems.check(adapter_widths, file)
    if widths is not None and widths["tokens"] is None:
        problems.add(f"{key}: {file} has no image projection (image_proj / ip_adapter_proj_model weights); "
                     f"it is not an IP-Adapter checkpoint of kind {cfg.kind}")
    return None if widths is None else widths["tokens"]


def check_mllm(cfg: MLLMConfig, problems: Problems, key: str = "encoders.mllm") -> Optional[int]:
    """The MLLM folder and its question set are usable; returns the width of its hidden states."""
    from omegaconf import DictConfig, OmegaConf
    from transformers import AutoConfig

    from .mllm import BACKENDS
    from .questions import question_set_from_config

    if cfg.backend not in BACKENDS:
        problems.add(f"{key}.backend={cfg.backend!r} is not supported; use one of {sorted(BACKENDS)}")
        return None
    if not (isinstance(cfg, DictConfig) and OmegaConf.is_missing(cfg, "questions")):  # ??? is reported as such
        problems.check(question_set_from_config, cfg)
    folder = problems.check(check_model, "MLLM", cfg.model, cfg.path, f"{key}.path", revision=cfg.revision)
    if folder is None:
        return None
    problems.check(verify_export_weights, folder, where=f"{key}.path")  # a finetuned export: weights = manifest
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if "mm_vision_tower" in raw or "LlavaLlamaForCausalLM" in (raw.get("architectures") or []):
        problems.add(f"{key}.path: {folder} is a checkpoint in the original LLaVA repository format; convert it "
                     f"once with `img-convert-llava {folder} OUT` and set {key}.path=OUT")
        return None
    found = AutoConfig.from_pretrained(folder)
    expected = BACKENDS[cfg.backend][1]
    if found.model_type != expected:
        problems.add(f"{key}.backend={cfg.backend!r} expects a {expected!r} model, but {folder} holds "
                     f"{found.model_type!r}; fix {key}.backend or {key}.path")
        return None
    return int(getattr(found, "text_config", found).hidden_size)
