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

from .vocab import clip_vocab

CROSS_ATTENTION_DIM = 64
TEXT_HIDDEN = 32  # each of the two text encoders
TEXT_PROJECTION_DIM = 32  # pooled projection of text_encoder_2 (1280 in the real model)
ADDITION_TIME_EMBED_DIM = 8
MAX_TEXT_LENGTH = 77


def _tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TEXT_LENGTH)


def _text_config(tokenizer, with_projection: bool):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TEXT_LENGTH,
        projection_dim=TEXT_PROJECTION_DIM if with_projection else 512,
        hidden_act="gelu" if with_projection else "quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_sdxl(out_dir: str | Path, seed: int = 0) -> Path:
    """Build and save the tiny pipeline to ``out_dir`` (created); returns ``out_dir``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    tokenizer_2 = _tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer, with_projection=False)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, with_projection=True)).eval()
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        use_linear_projection=True,
        cross_attention_dim=CROSS_ATTENTION_DIM,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        # 6 micro-conditioning numbers (original size, crop, target size) + pooled text projection
        projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + TEXT_PROJECTION_DIM,
    ).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
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
