"""A tiny, randomly initialised FLUX.1-dev pipeline in the real diffusers folder layout.

Same component classes and folder names as ``black-forest-labs/FLUX.1-dev`` (transformer with
guidance embedding, CLIP + T5 text encoders and tokenizers, AutoencoderKL with shift/scale factors,
and FLUX.1-dev's own ``FlowMatchEulerDiscreteScheduler`` config: dynamic shifting between
sequence lengths 256 and 4096, mu 0.5 .. 1.15), so ``FluxPipeline.from_pretrained`` and
``pipe.load_ip_adapter`` run their real code paths on it.

Tiny-world dimensions: the transformer is 32 wide (2 heads of 16) with 2 double-stream and 1
single-stream block; the T5 encoder keeps FLUX's 4096-wide output (``joint_attention_dim``), because
that is the width the XLabs IP-Adapter's key/value projections read. The VAE downsamples by 2
(4 latent channels), so 32x32 images give 16x16 latents, packed into 8x8 = 64 tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .ip_adapter import build_tiny_ip_adapter_flux
from .sizes import TINY_FLUX, TINY_VISION, ClipVisionSize, FluxSize, default_dtype
from .vocab import COMMON_WORDS, clip_vocab

INNER_DIM = TINY_FLUX.inner_dim  # attention_head_dim 16 x 2 heads (3072 = 128 x 24 in FLUX.1-dev)
NUM_DOUBLE_BLOCKS = TINY_FLUX.double_blocks  # 19 in FLUX.1-dev
T5_WIDTH = TINY_FLUX.t5_width  # joint_attention_dim, as in FLUX.1-dev

# FLUX.1-dev's scheduler/scheduler_config.json
SCHEDULER_CONFIG = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


def build_tiny_flux(out_dir: str | Path, seed: int = 0, size: FluxSize = TINY_FLUX,
                    dtype: torch.dtype = torch.float32) -> Path:
    """Build and save the pipeline to ``out_dir`` (created); returns ``out_dir``.

    ``size``: :data:`~.sizes.TINY_FLUX`, or :data:`~.sizes.REAL_WIDTH_FLUX` (3072 wide, 24 heads of
    128, one double- and one single-stream block, 16 latent channels, the 8x VAE), stored in
    ``dtype``. The text encoders stay tiny inside (T5: 4096 wide, 2 heads of 8), as in the tiny world.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    vocab, merges = clip_vocab()
    clip_tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    # T5's real structure: a Unigram model over "▁"-prefixed pieces, <pad>=0, </s>=1, <unk>=2.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in dict.fromkeys(COMMON_WORDS)] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    t5_tok = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)
    levels = len(size.vae_channels)
    with default_dtype(dtype):
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=size.pooled_dim, intermediate_size=37, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id)).eval()
        t5 = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=size.t5_width, d_kv=8, d_ff=16, num_layers=1,
                                     num_heads=2, pad_token_id=0, eos_token_id=1)).eval()
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=size.in_channels, num_layers=size.double_blocks,
            num_single_layers=size.single_blocks, attention_head_dim=size.head_dim, num_attention_heads=size.heads,
            joint_attention_dim=size.t5_width, pooled_projection_dim=size.pooled_dim, guidance_embeds=True,
            axes_dims_rope=size.axes_dims_rope).eval()
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * levels,
            up_block_types=["UpDecoderBlock2D"] * levels, block_out_channels=list(size.vae_channels),
            layers_per_block=size.vae_layers_per_block, latent_channels=size.latent_channels,
            norm_num_groups=size.vae_norm_groups, sample_size=size.sample_size, use_quant_conv=False,
            use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611).eval()  # BFL's (x-flux)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae, text_encoder=clip,
                        tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_tiny_flux_world(root: str | Path, seed: int = 0, size: FluxSize = TINY_FLUX,
                          ip_vision: ClipVisionSize = TINY_VISION,
                          dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
    """The FLUX pipeline (``root/flux``) and a matching XLabs v1 IP-Adapter (``root/ip_adapter``)."""
    root = Path(root)
    flux = build_tiny_flux(root / "flux", seed=seed, size=size, dtype=dtype)
    ipa = build_tiny_ip_adapter_flux(root / "ip_adapter", num_double_blocks=size.double_blocks,
                                     inner_dim=size.inner_dim, seed=seed, vision=ip_vision, vision_dtype=dtype)
    return flux, ipa
