"""Tiny CLIP vision towers saved as Hugging Face folders.

Stand-ins for the IP-Adapter image encoders: ``h94/IP-Adapter/models/image_encoder`` (OpenCLIP
ViT-H/14, penultimate hidden states ``[257, 1280]``) and ``openai/clip-vit-large-patch14`` (the
XLabs FLUX adapter's encoder, projected ``image_embeds`` of width 768). The tiny tower sees 32x32
inputs in 8x8 patches: 16 patches + CLS = 17 tokens of width 32.
"""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_SIZE = 32
PATCH_SIZE = 8
HIDDEN = 32
PROJECTION_DIM = 32


def build_tiny_clip_vision(out_dir: str | Path, seed: int = 0, projection_dim: int = PROJECTION_DIM) -> Path:
    """Save a ``CLIPVisionModelWithProjection`` + ``CLIPImageProcessor`` config to ``out_dir``."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=projection_dim,
        hidden_act="gelu",
    )
    model = CLIPVisionModelWithProjection(config).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    # The processor the official demos use: CLIP defaults at the tower's resolution.
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE).save_pretrained(out_dir)
    return out_dir
