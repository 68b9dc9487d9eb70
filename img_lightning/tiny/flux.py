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
from .vocab import COMMON_WORDS, clip_vocab

INNER_DIM = 32  # attention_head_dim 16 x 2 heads (3072 = 128 x 24 in FLUX.1-dev)
NUM_DOUBLE_BLOCKS = 2  # 19 in FLUX.1-dev
T5_WIDTH = 4096  # joint_attention_dim, as in FLUX.1-dev

# FLUX.1-dev's scheduler/scheduler_config.json
SCHEDULER_CONFIG = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


def build_tiny_flux(out_dir: str | Path, seed: int = 0) -> Path:
    """Build and save the tiny pipeline to ``out_dir`` (created); returns ``out_dir``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    vocab, merges = clip_vocab()
    clip_tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
        pad_token_id=clip_tok.pad_token_id)).eval()
    # T5's real structure: a Unigram model over "▁"-prefixed pieces, <pad>=0, </s>=1, <unk>=2.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in dict.fromkeys(COMMON_WORDS)] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    t5_tok = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)
    t5 = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=T5_WIDTH, d_kv=8, d_ff=16, num_layers=1,
                                 num_heads=2, pad_token_id=0, eos_token_id=1)).eval()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=NUM_DOUBLE_BLOCKS, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=INNER_DIM // 16, joint_attention_dim=T5_WIDTH, pooled_projection_dim=32,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.1159, scaling_factor=0.3611).eval()  # BFL's autoencoder factors (x-flux AutoEncoderParams)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae, text_encoder=clip,
                        tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_tiny_flux_world(root: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """The tiny FLUX pipeline (``root/flux``) and a matching XLabs v1 IP-Adapter (``root/ip_adapter``)."""
    root = Path(root)
    flux = build_tiny_flux(root / "flux", seed=seed)
    ipa = build_tiny_ip_adapter_flux(root / "ip_adapter", num_double_blocks=NUM_DOUBLE_BLOCKS, inner_dim=INNER_DIM,
                                     seed=seed)
    return flux, ipa
