"""A tiny, randomly initialised Stable Diffusion XL pipeline in the real diffusers folder layout.

Same component classes and folder names as ``stabilityai/stable-diffusion-xl-base-1.0`` (UNet with
``text_time`` addition embeddings, two CLIP text encoders - the second with a projection - two CLIP
tokenizers, AutoencoderKL, EulerDiscreteScheduler), so ``StableDiffusionXLPipeline.from_pretrained``
and ``pipe.load_ip_adapter`` run their real code paths on it.

Tiny-world dimensions: both text encoders have hidden size 32, so the UNet's
``cross_attention_dim`` is 64 (= 32 + 32, as 768 + 1280 = 2048 for the real model) and IP-Adapter
tokens are ``[16, 64]``. The VAE downsamples by 4, so 64x64 images use 16x16 latents.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .sizes import TINY_SDXL, ClipTextSize, SdxlSize, default_dtype
from .vocab import clip_vocab

CROSS_ATTENTION_DIM = TINY_SDXL.cross_attention_dim
TEXT_HIDDEN = TINY_SDXL.text.hidden  # each of the two text encoders
TEXT_PROJECTION_DIM = TINY_SDXL.text_projection  # pooled projection of text_encoder_2 (1280 in the real model)
ADDITION_TIME_EMBED_DIM = TINY_SDXL.addition_time_embed_dim
MAX_TEXT_LENGTH = 77


def _tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TEXT_LENGTH)


def _text_config(tokenizer, size: ClipTextSize, projection_dim: int | None):
    """CLIP-L's text encoder (``projection_dim`` None: no projection, quick_gelu) or OpenCLIP
    bigG's (with the pooled projection, gelu)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        max_position_embeddings=MAX_TEXT_LENGTH,
        projection_dim=projection_dim or 512,
        hidden_act="gelu" if projection_dim else "quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_sdxl(out_dir: str | Path, seed: int = 0, size: SdxlSize = TINY_SDXL,
                    dtype: torch.dtype = torch.float32) -> Path:
    """Build and save the pipeline to ``out_dir`` (created); returns ``out_dir``.

    ``size``: :data:`~.sizes.TINY_SDXL`, or :data:`~.sizes.REAL_WIDTH_SDXL` (SDXL's channel widths,
    cross-attention width 2048 and VAE, one block per level), stored in ``dtype``. Text encoders keep
    the tiny vocabulary either way (the tokenizers are not the real ones).
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    tokenizer_2 = _tokenizer()
    with default_dtype(dtype):
        text_encoder = CLIPTextModel(_text_config(tokenizer, size.text, None)).eval()
        text_config_2 = _text_config(tokenizer_2, size.text_2, size.text_projection)
        text_encoder_2 = CLIPTextModelWithProjection(text_config_2).eval()
        unet = UNet2DConditionModel(
            sample_size=size.sample_size // size.vae_scale_factor,
            in_channels=4,
            out_channels=4,
            block_out_channels=size.block_out_channels,
            layers_per_block=size.layers_per_block,
            down_block_types=size.down_block_types,
            up_block_types=size.up_block_types,
            norm_num_groups=size.norm_num_groups,
            attention_head_dim=size.attention_head_dim,
            transformer_layers_per_block=size.transformer_layers,
            use_linear_projection=True,
            cross_attention_dim=size.cross_attention_dim,
            addition_embed_type="text_time",
            addition_time_embed_dim=size.addition_time_embed_dim,
            # 6 micro-conditioning numbers (original size, crop, target size) + pooled text projection
            projection_class_embeddings_input_dim=6 * size.addition_time_embed_dim + size.text_projection,
        ).eval()
        levels = len(size.vae_channels)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=size.vae_channels,
            layers_per_block=size.vae_layers_per_block,
            latent_channels=4,
            norm_num_groups=size.vae_norm_groups,
            sample_size=size.sample_size,
            scaling_factor=0.13025,  # SDXL's VAE scaling factor
        ).eval()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
