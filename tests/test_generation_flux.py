"""FLUX through diffusers' FluxPipeline with the XLabs IP-Adapter, on a tiny FLUX built here.

The tiny FLUX (transformer, T5 + CLIP text encoders, VAE, tokenizers) is saved and loaded with
``FluxPipeline.from_pretrained`` like the real one. Its joint attention width is 4096 because the
XLabs adapter's ``to_k_ip`` reads 4096-wide tokens (``joint_attention_dim``), as in FLUX.1-dev.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from img_lightning.config.eval import IPAdapterConfig, PipelineConfig, SamplerConfig
from img_lightning.generation.ip_inject import PassThroughIPProjection
from img_lightning.generation.pipeline import DiffusionBackend


def build_tiny_flux(out: Path) -> Path:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    from img_lightning.tiny.vocab import COMMON_WORDS, clip_vocab

    torch.manual_seed(0)
    vocab, merges = clip_vocab()
    clip_tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
        pad_token_id=clip_tok.pad_token_id))
    # T5's real structure: a Unigram model over "▁"-prefixed pieces, <pad>=0, </s>=1, <unk>=2.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in dict.fromkeys(COMMON_WORDS)] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    t5_tok = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=32)
    t5 = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=4096, d_kv=8, d_ff=16, num_layers=1, num_heads=2,
                                 pad_token_id=0, eos_token_id=1))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=4096, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip, tokenizer=clip_tok,
                        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def flux_world(tmp_path_factory):
    from img_lightning.tiny.ip_adapter import build_tiny_ip_adapter_flux

    root = tmp_path_factory.mktemp("flux")
    return build_tiny_flux(root / "flux"), build_tiny_ip_adapter_flux(root / "ipa", num_double_blocks=1, inner_dim=32)


def test_flux_base_and_ip_conditioned_generation(flux_world):
    flux_dir, ipa_dir = flux_world
    cfg = OmegaConf.merge(OmegaConf.structured(PipelineConfig), dict(kind="flux", path=str(flux_dir), device="cpu"))
    backend = DiffusionBackend.from_config(cfg)
    sampler = OmegaConf.merge(OmegaConf.structured(SamplerConfig), dict(steps=2, guidance_scale=3.5, height=32, width=32))
    base = backend.generate(["a red circle"], [3], sampler)
    assert base[0].size == (32, 32)
    again = backend.generate(["a red circle"], [3], sampler)
    assert np.array_equal(np.asarray(base[0]), np.asarray(again[0]))
    ipa = OmegaConf.merge(OmegaConf.structured(IPAdapterConfig),
                          dict(path=str(ipa_dir), subfolder="", weight_name="ip_adapter.safetensors"))
    backend.load_ip_adapter(ipa)
    assert isinstance(backend.pipe.transformer.encoder_hid_proj, PassThroughIPProjection)
    assert backend.token_width() == 4096
    tokens = torch.randn(1, 16, 4096)
    backend.set_ip_scale(0.0)
    control = backend.generate(["a red circle"], [3], sampler, ip_tokens=tokens, negative_ip_tokens=torch.zeros(16, 4096))
    backend.set_ip_scale(1.0)
    img = backend.generate(["a red circle"], [3], sampler, ip_tokens=tokens, negative_ip_tokens=torch.zeros(16, 4096))
    c, i, b = (np.asarray(x[0], dtype=int) for x in (control, img, base))
    assert np.abs(c - b).max() <= 1  # IP scale 0 = the base image
    assert np.abs(i - c).max() > 0  # the tokens reach the transformer's IP attention
