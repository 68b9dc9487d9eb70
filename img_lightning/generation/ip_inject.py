"""Feeding already-projected IP tokens to a diffusers model that has an IP-Adapter loaded.

``pipe.load_ip_adapter`` installs ``encoder_hid_proj`` (the adapter's image projection) on the UNet
(SDXL) or transformer (FLUX), and the model runs it on whatever ``image_embeds`` it receives. IMG's
aligned tokens live *after* that projection (they are the resampler's output, the space the aligner
was trained in), so projecting them again would be wrong. :class:`PassThroughIPProjection` replaces
``encoder_hid_proj`` by an identity with the same interface; the adapter's attention layers
(``to_k_ip``/``to_v_ip``) then read our tokens exactly as they would read the adapter's own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class PassThroughIPProjection(nn.Module):
    """``encoder_hid_proj`` that returns the given tokens ``[B, N, D]`` as ``[B, 1, N, D]``."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original: Any = original  # kept: pipelines read .image_projection_layers / .num_ip_adapters

    @property
    def image_projection_layers(self) -> Any:
        return self.original.image_projection_layers

    @property
    def num_ip_adapters(self) -> int:
        return len(self.original.image_projection_layers)

    def forward(self, image_embeds: list[Tensor]) -> list[Tensor]:
        if not isinstance(image_embeds, (list, tuple)):
            image_embeds = [image_embeds]
        if len(image_embeds) != self.num_ip_adapters:
            raise ValueError(f"got tokens for {len(image_embeds)} IP-Adapters, {self.num_ip_adapters} are loaded")
        out = []
        for e in image_embeds:
            if e.ndim == 3:
                e = e[:, None]
            if e.ndim != 4:
                raise ValueError(f"IP tokens must be [B, N, D] or [B, 1, N, D], got {tuple(e.shape)}")
            out.append(e)
        return out


def ip_model(pipe: Any) -> Any:
    """The denoiser that carries ``encoder_hid_proj``: ``pipe.unet`` (SDXL) or ``pipe.transformer`` (FLUX),
    diffusers models whose IP-Adapter attributes (``attn_processors``, ...) only they declare."""
    model = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if model is None:
        raise TypeError(f"{type(pipe).__name__} has neither a unet nor a transformer")
    return model


def install_passthrough(pipe: Any) -> PassThroughIPProjection:
    """Swap the loaded adapter's projection for the pass-through (idempotent)."""
    model = ip_model(pipe)
    current = getattr(model, "encoder_hid_proj", None)
    if current is None:
        raise RuntimeError("no IP-Adapter is loaded on this pipeline (call load_ip_adapter first)")
    if isinstance(current, PassThroughIPProjection):
        return current
    wrapper = PassThroughIPProjection(current)
    model.encoder_hid_proj = wrapper
    return wrapper


def ip_token_width(pipe: Any) -> int:
    """Input width of the adapter's ``to_k_ip`` layers: the width our tokens must have."""
    for proc in ip_model(pipe).attn_processors.values():
        to_k = getattr(proc, "to_k_ip", None)
        if to_k:
            return int(to_k[0].in_features)
    raise RuntimeError("no IP-Adapter attention processors found on this pipeline")


def cfg_pair(negative: Tensor, positive: Tensor) -> Tensor:
    """SDXL pipelines split ``ip_adapter_image_embeds`` into (negative, positive) halves under CFG."""
    if negative.shape != positive.shape:
        negative = negative.expand_as(positive)
    return torch.cat([negative, positive], dim=0)
