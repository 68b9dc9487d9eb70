"""benchmarks/flop_model.py against torch's own FLOP counter running the real modules (transformers,
diffusers, our aligner) at the FULL sizes on the ``meta`` device: no memory, no compute, the
architecture's exact matrix products. The analytic counts leave out only what they say they leave out."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import flop_model as fm  # noqa: E402

from img_lightning.tiny import sizes  # noqa: E402


def counted(fn) -> float:
    with torch.device("meta"), torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def test_llava_13b_forward():
    """The tower, the projector and the LLaMA of LLaVA-1.5-13B, each run as transformers builds it
    (LLaVA's own forward checks image token counts with .item(), which the meta device cannot do)."""
    from transformers import CLIPVisionModel, LlamaConfig, LlamaModel, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from img_lightning.tiny.vision import clip_vision_config

    s = sizes.LLAVA_15_13B
    t = s.text
    text_config = LlamaConfig(vocab_size=t.vocab, hidden_size=t.hidden, intermediate_size=t.intermediate,
                              num_hidden_layers=t.layers, num_attention_heads=t.heads, num_key_value_heads=t.kv_heads)
    config = LlavaConfig(vision_config=clip_vision_config(s.vision), text_config=text_config,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    text = 94

    def forward():
        features = CLIPVisionModel(config.vision_config)(torch.zeros(1, 3, 336, 336),
                                                        output_hidden_states=True).hidden_states[-2][:, 1:]
        embeds = LlavaMultiModalProjector(config)(features)
        LlamaModel(text_config)(inputs_embeds=torch.cat([embeds, torch.zeros(1, text, t.hidden)], dim=1))

    assert fm.llava(s, text) == pytest.approx(counted(forward), rel=0.01)


def test_ip_adapter_plus_image():
    from diffusers.models.embeddings import IPAdapterPlusImageProjection
    from transformers import CLIPVisionModelWithProjection

    from img_lightning.tiny.vision import clip_vision_config

    v, r = sizes.CLIP_H_224, sizes.IP_PLUS_RESAMPLER

    def forward():
        tower = CLIPVisionModelWithProjection(clip_vision_config(v))
        proj = IPAdapterPlusImageProjection(embed_dims=v.hidden, output_dims=2048, hidden_dims=r.dim, depth=r.depth,
                                            dim_head=r.dim_head, heads=r.heads, num_queries=r.queries,
                                            ffn_ratio=r.ff_mult)
        proj(tower(torch.zeros(1, 3, 224, 224), output_hidden_states=True).hidden_states[-2])

    assert fm.ip_plus(v, r, 2048) == pytest.approx(counted(forward), rel=0.01)


def test_aligner_forward():
    from img_lightning.aligner import ImplicitAligner

    a = sizes.ALIGNER_SDXL
    tokens = 670

    def forward():
        model = ImplicitAligner(a.guidance_dim, a.dim, a.depth, a.heads, a.dim_head)
        model(torch.zeros(2, tokens, a.guidance_dim), torch.zeros(2, a.num_tokens, a.dim),
              torch.ones(2, tokens, dtype=torch.bool))

    assert 2 * fm.aligner(a, tokens) == pytest.approx(counted(forward), rel=0.01)


@pytest.mark.parametrize("ip_tokens", [0, 16])
def test_sdxl_unet_at_1024(ip_tokens):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    s = sizes.SDXL_BASE

    def forward():
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=s.block_out_channels, layers_per_block=s.layers_per_block,
            down_block_types=s.down_block_types, up_block_types=s.up_block_types,
            attention_head_dim=s.attention_head_dim, transformer_layers_per_block=s.transformer_layers,
            use_linear_projection=True, cross_attention_dim=2048, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
        kwargs = {}
        if ip_tokens:
            procs = {name: (IPAdapterAttnProcessor2_0(hidden_size=unet.config.block_out_channels[0],
                                                      cross_attention_dim=2048, num_tokens=(ip_tokens,))
                            if name.endswith("attn2.processor") else proc)
                     for name, proc in unet.attn_processors.items()}
            # the hidden size differs per level: build each processor at its block's width
            for name in procs:
                if name.endswith("attn2.processor"):
                    width = dict(unet.named_modules())[name[: -len(".processor")]].to_q.out_features
                    procs[name] = IPAdapterAttnProcessor2_0(hidden_size=width, cross_attention_dim=2048,
                                                            num_tokens=(ip_tokens,))
            unet.set_attn_processor(procs)
            kwargs["ip_adapter_image_embeds"] = [torch.zeros(1, ip_tokens, 2048)]
        unet(torch.zeros(1, 4, 128, 128), torch.tensor([500.0]), torch.zeros(1, 77, 2048),
             added_cond_kwargs={"text_embeds": torch.zeros(1, 1280), "time_ids": torch.zeros(1, 6), **kwargs})

    assert fm.sdxl_unet(s, 1024, 1024, ip_tokens=ip_tokens) == pytest.approx(counted(forward), rel=0.01)


def test_flux_transformer_at_1024():
    from diffusers import FluxTransformer2DModel

    s = sizes.FLUX_1_DEV
    n_img = 64 * 64

    def forward():
        model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=s.double_blocks,
                                       num_single_layers=s.single_blocks, attention_head_dim=s.head_dim,
                                       num_attention_heads=s.heads, joint_attention_dim=4096,
                                       pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
        model(hidden_states=torch.zeros(1, n_img, 64), encoder_hidden_states=torch.zeros(1, 512, 4096),
              pooled_projections=torch.zeros(1, 768), timestep=torch.tensor([0.5]), img_ids=torch.zeros(n_img, 3),
              txt_ids=torch.zeros(512, 3), guidance=torch.tensor([3.5]))

    assert fm.flux_transformer(s, 1024, 1024) == pytest.approx(counted(forward), rel=0.01)
