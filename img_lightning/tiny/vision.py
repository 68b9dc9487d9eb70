"""Tiny CLIP vision towers saved as Hugging Face folders.

Stand-ins for the IP-Adapter image encoders: ``h94/IP-Adapter/models/image_encoder`` (OpenCLIP
ViT-H/14, penultimate hidden states ``[257, 1280]``) and ``openai/clip-vit-large-patch14`` (the
XLabs FLUX adapter's encoder, projected ``image_embeds`` of width 768). The tiny tower sees 32x32
inputs in 8x8 patches: 16 patches + CLS = 17 tokens of width 32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .sizes import TINY_VISION, ClipVisionSize, default_dtype

IMAGE_SIZE = TINY_VISION.image_size
PATCH_SIZE = TINY_VISION.patch
HIDDEN = TINY_VISION.hidden
PROJECTION_DIM = TINY_VISION.projection_dim


def clip_vision_config(size: ClipVisionSize, projection_dim: Optional[int] = None):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        image_size=size.image_size,
        patch_size=size.patch,
        projection_dim=projection_dim or size.projection_dim,
        hidden_act=size.act,
    )


def build_tiny_clip_vision(out_dir: str | Path, seed: int = 0, projection_dim: Optional[int] = None,
                           size: ClipVisionSize = TINY_VISION, dtype: torch.dtype = torch.float32) -> Path:
    """Save a ``CLIPVisionModelWithProjection`` + ``CLIPImageProcessor`` config to ``out_dir``
    (``size``: :data:`~.sizes.TINY_VISION`, or a real-width tower from :mod:`.sizes`, stored in ``dtype``)."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    with default_dtype(dtype):
        model = CLIPVisionModelWithProjection(clip_vision_config(size, projection_dim)).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    # The processor the official demos use: CLIP defaults at the tower's resolution.
    CLIPImageProcessor(size={"shortest_edge": size.image_size}, crop_size=size.image_size).save_pretrained(out_dir)
    return out_dir
