"""HPS v2 / v2.1: open_clip ``ViT-H-14`` with the HPS checkpoint and HPS's own preprocessing.

HPS does not resize + centre-crop like CLIP: it converts the image to a tensor, resizes the LONGEST
side to 224 (bicubic, on the tensor), zero-pads to a square (padding centred, odd pixel at the
right/bottom) and normalises with the OpenAI mean/std (DESIGN §6). A centre crop would cut off the
sides of non-square images and change the score. The checkpoint is ``{"state_dict": ...}`` and is
loaded with ``weights_only=True``; v2.0 and v2.1 scores are not comparable, so the version is
printed in every report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor

from ...models import ModelNotFoundError, resolve_device
from .base import Scorer, register, rgb

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def hps_preprocess(image: Image.Image, size: int = 224) -> Tensor:
    """HPS's eval transform: RGB -> tensor -> longest side to ``size`` (bicubic) -> zero pad -> normalise."""
    x = TF.to_tensor(image.convert("RGB"))
    h, w = x.shape[1:]
    scale = size / float(max(h, w))
    if scale != 1.0:
        new_h, new_w = round(h * scale), round(w * scale)
        x = TF.resize(x, [new_h, new_w], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        pad_h, pad_w = size - new_h, size - new_w
        # left, top, right, bottom
        x = TF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(x, OPENAI_MEAN, OPENAI_STD)


def load_hps_state_dict(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(
            f"HPS checkpoint not found: {path}. Download HPS_v2_compressed.pt (v2.0) or "
            f"HPS_v2.1_compressed.pt (v2.1) from the HF repo xswu/HPSv2 and set checkpoint=PATH."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected {{'state_dict': ...}} or a state dict")
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}


class HPSScorer(Scorer):
    def __init__(
        self, model: Any, tokenizer: Any, device: torch.device, scale: float = 100.0, version: str = "v2.1",
        arch: str = "ViT-H-14", batch_size: int = 16, name: str = "hps",
    ) -> None:
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.device = device
        self.scale = scale
        self.version = version
        self.arch = arch
        self.batch_size = batch_size
        self.name = name
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)

    @classmethod
    def from_config(cls, cfg: Any) -> "HPSScorer":
        import open_clip

        if cfg.model_config:
            open_clip.add_model_config(cfg.model_config)
        arch = cfg.model or "ViT-H-14"
        if arch not in open_clip.list_models():
            raise ValueError(f"hps: unknown open_clip architecture '{arch}' (register it with model_config=FILE.json)")
        if not cfg.checkpoint:
            raise ModelNotFoundError("hps: set checkpoint=PATH to HPS_v2_compressed.pt or HPS_v2.1_compressed.pt")
        state = load_hps_state_dict(cfg.checkpoint)
        model = open_clip.create_model(arch, pretrained=None, device="cpu")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{cfg.checkpoint}: does not fit open_clip '{arch}' (missing {list(missing)[:5]}, "
                f"unexpected {list(unexpected)[:5]})"
            )
        device = resolve_device(cfg.device)
        return cls(
            model, open_clip.get_tokenizer(arch), device, scale=100.0 if cfg.scale is None else cfg.scale,
            version=cfg.version or "v2.1", arch=arch, batch_size=cfg.batch_size, name=cfg.name or "hps",
        )

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> Tensor:
        pixels = torch.stack([hps_preprocess(im, self.image_size) for im in rgb(images)]).to(self.device)
        tokens = self.tokenizer(prompts).to(self.device)
        img = self.model.encode_image(pixels, normalize=True)
        txt = self.model.encode_text(tokens, normalize=True)
        return (img * txt).sum(-1).float() * self.scale

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "hps", "arch": self.arch, "version": self.version, "scale": self.scale}


@register("hps")
def _build(cfg: Any, **_: Any) -> Scorer:
    return HPSScorer.from_config(cfg)
