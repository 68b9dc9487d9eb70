"""The dimensions of every model ``img_lightning.tiny`` builds: tiny (milliseconds on a CPU), real
width (the released models' widths with very few layers) and full (the released configs, for the
FLOP counts of ``benchmarks/real_width.py``; never built here).

Full sizes, from the released configs: ``llava-hf/llava-1.5-13b-hf`` (Llama-2-13B: hidden 5120,
intermediate 13824, 40 layers of 40 heads, vocabulary 32064 with the image and pad tokens; CLIP
ViT-L/14-336: 1024 wide, 24 layers, 577 tokens), ``h94/IP-Adapter`` SDXL plus (OpenCLIP ViT-H/14:
1280 wide, 32 layers, 257 tokens; resampler dim 1280, depth 4, 20 heads of 64, 16 queries -> 2048),
``stabilityai/stable-diffusion-xl-base-1.0`` (UNet 320/640/1280 channels, 2 resnets per level,
transformer depths 1/2/10, cross-attention 2048 = CLIP-L 768 + OpenCLIP-bigG 1280), FLUX.1-dev
(3072 wide = 24 heads of 128, 19 double- and 38 single-stream blocks, T5 width 4096), XLabs'
FLUX IP-Adapter v1 (CLIP ViT-L/14 224: 1024 wide, projection 768 -> 4 x 4096 tokens), and the IMG
aligner (SDXL: dim 2048, depth 4, 20 heads of 64, guidance 5120).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class ClipVisionSize:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    image_size: int
    patch: int
    projection_dim: int
    act: str = "gelu"  # OpenAI's CLIP towers: quick_gelu; OpenCLIP's: gelu

    @property
    def tokens(self) -> int:
        """Patch tokens + CLS."""
        return (self.image_size // self.patch) ** 2 + 1


@dataclass(frozen=True)
class LlamaSize:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int  # 0: the tokenizer's own size (the tiny models)
    max_positions: int


@dataclass(frozen=True)
class LlavaSize:
    vision: ClipVisionSize
    text: LlamaSize


@dataclass(frozen=True)
class ResamplerSize:
    """IP-Adapter-Plus's Perceiver resampler."""

    dim: int
    depth: int
    dim_head: int
    heads: int
    queries: int
    ff_mult: int = 4


@dataclass(frozen=True)
class ClipTextSize:
    hidden: int
    intermediate: int
    layers: int
    heads: int


@dataclass(frozen=True)
class SdxlSize:
    text: ClipTextSize  # text_encoder (CLIP-L in the real model)
    text_2: ClipTextSize  # text_encoder_2 (OpenCLIP bigG, with a projection)
    text_projection: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    attention_head_dim: tuple[int, ...]  # diffusers' name; in SDXL it is the number of heads per level
    transformer_layers: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    addition_time_embed_dim: int
    vae_channels: tuple[int, ...]  # len - 1 downsamplings
    vae_layers_per_block: int
    vae_norm_groups: int
    sample_size: int  # default image side in pixels

    @property
    def cross_attention_dim(self) -> int:
        return self.text.hidden + self.text_2.hidden

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)


@dataclass(frozen=True)
class FluxSize:
    head_dim: int
    heads: int
    double_blocks: int
    single_blocks: int
    in_channels: int  # 16 latent channels x 2x2 packing = 64
    latent_channels: int
    axes_dims_rope: tuple[int, int, int]
    pooled_dim: int  # CLIP text width (the pooled projection)
    t5_width: int  # joint_attention_dim
    vae_channels: tuple[int, ...]
    vae_layers_per_block: int
    vae_norm_groups: int
    sample_size: int  # default image side in pixels

    @property
    def inner_dim(self) -> int:
        return self.head_dim * self.heads


@dataclass(frozen=True)
class AlignerSize:
    guidance_dim: int
    dim: int
    depth: int
    heads: int
    dim_head: int
    num_tokens: int
    ff_mult: int = 4


# -- full sizes (the released models) ------------------------------------------------------------
CLIP_L_336 = ClipVisionSize(hidden=1024, intermediate=4096, layers=24, heads=16, image_size=336, patch=14,
                            projection_dim=768, act="quick_gelu")
CLIP_H_224 = ClipVisionSize(hidden=1280, intermediate=5120, layers=32, heads=16, image_size=224, patch=14,
                            projection_dim=1024)
CLIP_L_224 = ClipVisionSize(hidden=1024, intermediate=4096, layers=24, heads=16, image_size=224, patch=14,
                            projection_dim=768, act="quick_gelu")
LLAMA_2_13B = LlamaSize(hidden=5120, intermediate=13824, layers=40, heads=40, kv_heads=40, vocab=32064,
                        max_positions=4096)
LLAVA_15_13B = LlavaSize(vision=CLIP_L_336, text=LLAMA_2_13B)
IP_PLUS_RESAMPLER = ResamplerSize(dim=1280, depth=4, dim_head=64, heads=20, queries=16)
SDXL_BASE = SdxlSize(
    text=ClipTextSize(hidden=768, intermediate=3072, layers=12, heads=12),
    text_2=ClipTextSize(hidden=1280, intermediate=5120, layers=32, heads=20),
    text_projection=1280,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20),
    transformer_layers=(1, 2, 10),
    layers_per_block=2,
    norm_num_groups=32,
    addition_time_embed_dim=256,
    vae_channels=(128, 256, 512, 512),
    vae_layers_per_block=2,
    vae_norm_groups=32,
    sample_size=1024,
)
FLUX_1_DEV = FluxSize(head_dim=128, heads=24, double_blocks=19, single_blocks=38, in_channels=64, latent_channels=16,
                      axes_dims_rope=(16, 56, 56), pooled_dim=768, t5_width=4096, vae_channels=(128, 256, 512, 512),
                      vae_layers_per_block=2, vae_norm_groups=32, sample_size=1024)
ALIGNER_SDXL = AlignerSize(guidance_dim=5120, dim=2048, depth=4, heads=20, dim_head=64, num_tokens=16)

# -- real width: the full widths, very few layers ------------------------------------------------
REAL_WIDTH_LLAVA = LlavaSize(vision=replace(CLIP_L_336, layers=2), text=replace(LLAMA_2_13B, layers=1))
REAL_WIDTH_IP_VISION = replace(CLIP_H_224, layers=2)
REAL_WIDTH_FLUX_IP_VISION = replace(CLIP_L_224, layers=1)
REAL_WIDTH_SDXL = replace(
    SDXL_BASE,
    text=replace(SDXL_BASE.text, layers=1),
    text_2=replace(SDXL_BASE.text_2, layers=2),  # SDXL reads text_encoder_2's penultimate layer
    transformer_layers=(1, 1, 1),
    layers_per_block=1,
)
REAL_WIDTH_FLUX = replace(FLUX_1_DEV, double_blocks=1, single_blocks=1)

# -- tiny (what the demo and the tests build) ----------------------------------------------------
TINY_VISION = ClipVisionSize(hidden=32, intermediate=64, layers=3, heads=2, image_size=32, patch=8, projection_dim=32)
TINY_LLAVA = LlavaSize(vision=replace(TINY_VISION, act="quick_gelu"),
                       text=LlamaSize(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=4, vocab=0,
                                      max_positions=512))
TINY_RESAMPLER = ResamplerSize(dim=64, depth=4, dim_head=64, heads=1, queries=16)
# Cross-attention 64 = 32 + 32 (as 768 + 1280 = 2048); the VAE downsamples by 4: 64 px -> 16x16 latents.
TINY_SDXL = SdxlSize(
    text=ClipTextSize(hidden=32, intermediate=64, layers=2, heads=2),
    text_2=ClipTextSize(hidden=32, intermediate=64, layers=2, heads=2),
    text_projection=32,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    transformer_layers=(1, 1),
    layers_per_block=1,
    norm_num_groups=8,
    addition_time_embed_dim=8,
    vae_channels=(8, 16, 16),
    vae_layers_per_block=1,
    vae_norm_groups=8,
    sample_size=64,
)
# 32 wide (2 heads of 16), patch 1 over 4 latent channels; T5 keeps FLUX's 4096 (the XLabs adapter
# reads that width); the VAE downsamples by 2: 32 px -> 16x16 latents -> 8x8 = 64 packed tokens.
TINY_FLUX = FluxSize(head_dim=16, heads=2, double_blocks=2, single_blocks=1, in_channels=16, latent_channels=4,
                     axes_dims_rope=(4, 6, 6), pooled_dim=32, t5_width=4096, vae_channels=(8, 16),
                     vae_layers_per_block=1, vae_norm_groups=4, sample_size=32)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules straight in ``dtype`` (a real-width model is never materialised in float32)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)
