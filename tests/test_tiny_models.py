"""The tiny models load back through the same code paths as the released checkpoints."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from img_lightning.tiny.ip_adapter import SDXL_PLUS_SUBFOLDER, SDXL_PLUS_WEIGHT


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tiny_sdxl_layout_and_generation(tiny_sdxl_dir, sdxl_pipe):
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (tiny_sdxl_dir / sub).is_dir(), sub
    assert (tiny_sdxl_dir / "model_index.json").is_file()
    assert sdxl_pipe.unet.config.cross_attention_dim == 64
    assert sdxl_pipe.unet.config.addition_embed_type == "text_time"
    assert type(sdxl_pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    out = sdxl_pipe("a red circle on a blue background", num_inference_steps=2, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    again = sdxl_pipe("a red circle on a blue background", num_inference_steps=2, height=64, width=64,
                      generator=torch.Generator().manual_seed(0), output_type="np").images
    np.testing.assert_array_equal(out, again)


def test_tiny_ip_adapter_original_layout_loads_into_sdxl(tiny_sdxl_dir, tiny_ip_adapter_dir):
    from diffusers import StableDiffusionXLPipeline
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    weight = tiny_ip_adapter_dir / SDXL_PLUS_SUBFOLDER / SDXL_PLUS_WEIGHT
    with safe_open(str(weight), "pt") as f:
        keys = set(f.keys())
    assert "image_proj.latents" in keys and "image_proj.layers.3.0.to_kv.weight" in keys
    ip_keys = sorted(k for k in keys if k.startswith("ip_adapter."))
    assert ip_keys and all(k.endswith(("to_k_ip.weight", "to_v_ip.weight")) for k in ip_keys)
    assert all(int(k.split(".")[1]) % 2 == 1 for k in ip_keys)  # cross-attention processors

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(tiny_ip_adapter_dir), subfolder=SDXL_PLUS_SUBFOLDER, weight_name=SDXL_PLUS_WEIGHT,
                         image_encoder_folder="models/image_encoder")
    proj = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    assert isinstance(proj, IPAdapterPlusImageProjection)
    pipe.set_ip_adapter_scale(1.0)
    images = []
    for colour in ((255, 0, 0), (0, 0, 255)):
        images.append(pipe("a shape", ip_adapter_image=Image.new("RGB", (64, 64), colour), num_inference_steps=2,
                           height=64, width=64, generator=torch.Generator().manual_seed(0),
                           output_type="np").images)
    assert np.abs(images[0] - images[1]).mean() > 1e-3  # the IP image steers generation


def test_tiny_mllms_load_with_their_real_classes(tiny_llava_dir, tiny_qwen_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

    cases = [
        (tiny_llava_dir, LlavaForConditionalGeneration, "LlavaProcessor", "USER: <image>\n"),
        (tiny_qwen_dir, Qwen2_5_VLForConditionalGeneration, "Qwen2_5_VLProcessor",
         "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"),
    ]
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is red?"}]}]
    for folder, cls, proc_name, marker in cases:
        model = cls.from_pretrained(folder)
        processor = AutoProcessor.from_pretrained(folder)
        assert type(processor).__name__ == proc_name
        assert model.config.text_config.hidden_size == 64
        text = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        assert marker in text and "what is red?" in text
        batch = processor(images=[Image.new("RGB", (64, 64), (200, 10, 10))], text=[text], return_tensors="pt")
        image_token = model.config.image_token_id
        assert int((batch["input_ids"] == image_token).sum()) == 16
        with torch.no_grad():
            out = model(**batch)
        assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.logits).all()


def test_tiny_flux_ip_adapter_loads_through_flux_pipeline(tmp_path):
    """XLabs layout through ``FluxPipeline.load_ip_adapter`` (a tiny transformer, no text encoders)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from img_lightning.tiny.ip_adapter import FLUX_WEIGHT, build_tiny_ip_adapter_flux

    root = build_tiny_ip_adapter_flux(tmp_path / "flux_ipa", num_double_blocks=1, inner_dim=32)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=4096, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6],
    )
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.load_ip_adapter(str(root), weight_name=FLUX_WEIGHT,
                         image_encoder_pretrained_model_name_or_path=str(root / "image_encoder"),
                         image_encoder_dtype=torch.float32)
    embeds = pipe.encode_image([Image.new("RGB", (64, 64), (10, 200, 10))], "cpu", 1)
    with torch.no_grad():
        tokens = pipe.transformer.encoder_hid_proj([embeds[:, None]])[0]
    assert tokens.shape == (1, 1, 4, 4096)  # XLabs v1: ImageProjModel(4096, 768, 4)
