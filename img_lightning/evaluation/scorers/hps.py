"""HPS v2 / v2.1: open_clip ``ViT-H-14`` with the HPS checkpoint and HPS's own preprocessing.

HPS does not resize + centre-crop like CLIP: it converts the image to a tensor, resizes the LONGEST
side to 224 (bicubic, on the tensor), zero-pads to a square (padding centred, odd pixel at the
right/bottom) and normalises with the OpenAI mean/std. A centre crop would cut off the sides of
non-square images and change the score.

Where we differ from ``hpsv2`` on purpose:

- **Always square.** HPSv2's ``ResizeMaxSize`` pads only inside its ``scale != 1`` branch, so an
  image whose longest side is already 224 but that is not square (e.g. 224 x 160) is passed on
  unpadded and the model fails on it. We pad every image to the square; on every image ``hpsv2``
  can score, the two agree exactly.
- **Antialias pinned.** ``hpsv2`` calls torchvision's tensor ``resize`` without ``antialias``, whose
  default changed in torchvision 0.17 (False before, True since), so its scores depend on the
  installed torchvision. ``antialias`` (config, default True = ``hpsv2`` on a current torchvision)
  makes the choice explicit.
- **Scale.** ``hpsv2.score()`` returns the raw cosine; benchmark tables (and this scorer, ``scale``
  100) report 100 x cosine.

The checkpoint is ``{"state_dict": ...}`` loaded with ``weights_only=True``. v2.0 and v2.1 scores are
not comparable: the version is read from the released file name (``HPS_v2_compressed.pt`` -> v2.0,
``HPS_v2.1_compressed.pt`` -> v2.1), a ``version`` that contradicts it is refused, and the report
prints the version and the checkpoint's sha256.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor

from ...config.eval import ScorerConfig
from ...errors import Problems
from ...models import ModelNotFoundError, compute_dtype, resolve_device
from .base import Scorer, register, register_check, rgb
from .checkpoints import CheckpointError, file_sha256, need_file
from .transforms import OPENAI_MEAN, OPENAI_STD

# The released checkpoints (HF repo xswu/HPSv2) and the version each one is.
CHECKPOINT_VERSIONS = {"HPS_v2_compressed.pt": "v2.0", "HPS_v2.1_compressed.pt": "v2.1"}


def hps_preprocess(image: Image.Image, size: int = 224, antialias: bool = True) -> Tensor:
    """HPS's eval transform: RGB -> tensor -> longest side to ``size`` (bicubic) -> zero pad to a
    square -> normalise. Pads every non-square image, unlike ``hpsv2`` (see the module docstring)."""
    x = TF.to_tensor(image.convert("RGB"))
    h, w = x.shape[1:]
    scale = size / float(max(h, w))
    new_h, new_w = round(h * scale), round(w * scale)
    if scale != 1.0:
        x = TF.resize(x, [new_h, new_w], interpolation=TF.InterpolationMode.BICUBIC, antialias=antialias)
    pad_h, pad_w = size - new_h, size - new_w
    if pad_h or pad_w:  # left, top, right, bottom
        x = TF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(x, OPENAI_MEAN, OPENAI_STD)


def hps_advice(key: str) -> str:
    """Where the HPS checkpoints are (v2.1; v2.0 is the other file of the same repository)."""
    from ...model_sources import checkpoint_advice

    return checkpoint_advice("xswu/HPSv2", "HPS_v2.1_compressed.pt", key) + " (v2.0: HPS_v2_compressed.pt)"


def hps_version(checkpoint: str | Path, configured: Optional[str]) -> str:
    """The HPS version of ``checkpoint``: from its released file name; ``configured`` must agree
    with it, and is required for a file under another name."""
    name = Path(checkpoint).name
    found = CHECKPOINT_VERSIONS.get(name)
    if found and configured and configured != found:
        raise CheckpointError(
            f"hps: {name} is HPS {found}, but version={configured} is configured; v2.0 and v2.1 scores are not "
            f"comparable: fix `version` (or drop it: it is read from the file name)"
        )
    if not (found or configured):
        raise CheckpointError(
            f"hps: cannot tell the HPS version of {name} (released names: {', '.join(CHECKPOINT_VERSIONS)}); "
            f"set version=v2.0 or version=v2.1"
        )
    return found or str(configured)


def load_hps_state_dict(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"HPS checkpoint not found: {path}; {hps_advice('checkpoint')}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected {{'state_dict': ...}} or a state dict")
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}



@contextlib.contextmanager
def _quiet_root_warnings() -> Iterator[None]:
    """Hide warnings logged on the root logger (open_clip's ``logging.warning``) for a moment."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(previous)

class HPSScorer(Scorer):
    def __init__(
        self, model: Any, tokenizer: Any, device: torch.device, scale: float = 100.0, version: str = "v2.1",
        arch: str = "ViT-H-14", batch_size: int = 16, name: str = "hps", dtype: torch.dtype = torch.float32,
        antialias: bool = True, sha256: Optional[str] = None,
    ) -> None:
        self.model = model.eval().to(device=device, dtype=dtype)
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.scale = scale
        self.version = version
        self.arch = arch
        self.batch_size = batch_size
        self.name = name
        self.antialias = antialias
        self.sha256 = sha256
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)

    @classmethod
    def from_config(cls, cfg: ScorerConfig) -> HPSScorer:
        import open_clip

        if cfg.model_config:
            open_clip.add_model_config(cfg.model_config)
        arch = cfg.model or "ViT-H-14"
        if arch not in open_clip.list_models():
            raise CheckpointError(f"hps: unknown open_clip architecture '{arch}' "
                                  f"(register it with model_config=FILE.json)")
        if not cfg.checkpoint:
            raise ModelNotFoundError(f"hps: no checkpoint set; {hps_advice('checkpoint')}")
        version = hps_version(cfg.checkpoint, cfg.version)
        state = load_hps_state_dict(cfg.checkpoint)
        with _quiet_root_warnings():  # open_clip warns "initialized randomly": the HPS weights come next
            model = open_clip.create_model(arch, pretrained=None, device="cpu")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{cfg.checkpoint}: does not fit open_clip '{arch}' (missing {list(missing)[:5]}, "
                f"unexpected {list(unexpected)[:5]})"
            )
        device = resolve_device(cfg.device)
        return cls(
            model, open_clip.get_tokenizer(arch), device, scale=100.0 if cfg.scale is None else cfg.scale,
            version=version, arch=arch, batch_size=cfg.batch_size, name=cfg.name or "hps",
            dtype=compute_dtype(cfg.dtype, device), antialias=cfg.antialias, sha256=file_sha256(cfg.checkpoint),
        )

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> Tensor:
        pixels = torch.stack([hps_preprocess(im, self.image_size, self.antialias) for im in rgb(images)])
        tokens = self.tokenizer(prompts).to(self.device)
        img = self.model.encode_image(pixels.to(self.device, self.dtype), normalize=True).float()
        txt = self.model.encode_text(tokens, normalize=True).float()
        return (img * txt).sum(-1) * self.scale

    def info(self) -> dict[str, Any]:
        return {"kind": "hps", "model": self.arch, "version": self.version, "sha256": self.sha256,
                "dtype": str(self.dtype).replace("torch.", ""), "antialias": self.antialias, "exact": True,
                "reference": "hpsv2 (tgxs002/HPSv2) hpsv2.score()",
                "scale": f"{self.scale:g} x cosine (hpsv2.score() returns the raw cosine)",
                "note": "non-square images whose longest side is already the model size are zero-padded "
                        "(hpsv2 skips the pad there and fails)"}


@register("hps")
def _build(cfg: ScorerConfig, **_: Any) -> Scorer:
    return HPSScorer.from_config(cfg)


@register_check("hps")
def _check(cfg: ScorerConfig, key: str, problems: Problems, **_: Any) -> None:
    import open_clip

    if cfg.model_config:
        config = problems.check(need_file, cfg.model_config, "open_clip model config (JSON)", f"{key}.model_config")
        if config is not None:
            open_clip.add_model_config(str(config))
    arch = cfg.model or "ViT-H-14"
    if arch not in open_clip.list_models():
        problems.add(f"{key}.model: unknown open_clip architecture '{arch}' (register it with "
                     f"{key}.model_config=FILE.json)")
    path = problems.check(need_file, cfg.checkpoint, "HPS checkpoint", f"{key}.checkpoint",
                          hps_advice(f"{key}.checkpoint"))
    if path is not None:
        problems.check(hps_version, path, cfg.version, where=f"{key}.version")
