"""The real-width world: builders at the released models' widths, and every stage end to end on it.

The end-to-end tests are opt-in (``pytest --real-width``, see conftest.py): they write ~5 GB of
models and take minutes on 2 CPU cores. The size table itself is checked in every run.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from img_lightning.tiny import sizes


def _widths(size) -> dict:
    """Every field of a size dataclass except the depths (layer and block counts)."""
    depth = {"layers", "transformer_layers", "layers_per_block", "double_blocks", "single_blocks"}
    out = {}
    for f in dataclasses.fields(size):
        value = getattr(size, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = _widths(value)
        elif f.name not in depth:
            out[f.name] = value
    return out


@pytest.mark.parametrize("real, full", [
    (sizes.REAL_WIDTH_LLAVA, sizes.LLAVA_15_13B), (sizes.REAL_WIDTH_IP_VISION, sizes.CLIP_H_224),
    (sizes.REAL_WIDTH_FLUX_IP_VISION, sizes.CLIP_L_224), (sizes.REAL_WIDTH_SDXL, sizes.SDXL_BASE),
    (sizes.REAL_WIDTH_FLUX, sizes.FLUX_1_DEV),
], ids=["llava", "ip_vision", "flux_ip_vision", "sdxl", "flux"])
def test_real_width_models_keep_every_width_and_cut_only_depth(real, full):
    assert _widths(real) == _widths(full)
    assert real != full  # and they are cut


def test_full_sizes_are_the_released_configs():
    assert (sizes.LLAMA_2_13B.hidden, sizes.LLAMA_2_13B.intermediate, sizes.LLAMA_2_13B.heads,
            sizes.LLAMA_2_13B.layers, sizes.LLAMA_2_13B.vocab) == (5120, 13824, 40, 40, 32064)
    assert sizes.CLIP_L_336.tokens == 577 and sizes.CLIP_H_224.tokens == 257
    assert sizes.SDXL_BASE.cross_attention_dim == 2048 and sizes.SDXL_BASE.vae_scale_factor == 8
    assert sizes.FLUX_1_DEV.inner_dim == 3072
    a = sizes.ALIGNER_SDXL
    assert (a.guidance_dim, a.dim, a.depth, a.heads, a.dim_head) == (5120, 2048, 4, 20, 64)


def test_builders_follow_the_size_they_are_given(tmp_path):
    """The builders are parametrised, not hard-wired to the tiny dims (checked on a small custom size)."""
    from img_lightning.tiny.mllm import build_tiny_llava

    custom = sizes.LlavaSize(vision=dataclasses.replace(sizes.TINY_VISION, hidden=48, heads=3, image_size=24),
                             text=dataclasses.replace(sizes.TINY_LLAVA.text, hidden=96, layers=1, vocab=1000))
    folder = build_tiny_llava(tmp_path / "llava", size=custom, dtype=torch.bfloat16)
    cfg = json.loads((folder / "config.json").read_text())
    text = cfg["text_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["vocab_size"],
            cfg["vision_config"]["hidden_size"], cfg["image_seq_length"]) == (96, 1, 1000, 48, 9)
    assert cfg["dtype" if "dtype" in cfg else "torch_dtype"] == "bfloat16"


# -- opt-in: the real-width world ----------------------------------------------------------------
@pytest.fixture(scope="module")
def real_width_models(tmp_path_factory):
    from img_lightning.tiny.real_width import build_real_width_world

    return build_real_width_world(tmp_path_factory.mktemp("real_width") / "models")


@pytest.mark.slow
@pytest.mark.real_width
def test_real_width_models_load_with_their_real_shapes(real_width_models):
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    from safetensors import safe_open
    from transformers import AutoConfig

    from img_lightning.aligner import ImplicitAligner
    from img_lightning.tiny.ip_adapter import SDXL_PLUS_SUBFOLDER, SDXL_PLUS_WEIGHT

    m = real_width_models
    llava = AutoConfig.from_pretrained(m["llava"])
    assert (llava.text_config.hidden_size, llava.text_config.intermediate_size, llava.text_config.num_attention_heads,
            llava.text_config.vocab_size, llava.vision_config.hidden_size, llava.image_seq_length) == \
        (5120, 13824, 40, 32064, 1024, 576)
    unet = UNet2DConditionModel.load_config(m["sdxl"] / "unet")
    assert tuple(unet["block_out_channels"]) == (320, 640, 1280) and unet["cross_attention_dim"] == 2048
    with safe_open(str(m["ip_adapter"] / SDXL_PLUS_SUBFOLDER / SDXL_PLUS_WEIGHT), "pt") as f:
        assert list(f.get_slice("image_proj.latents").get_shape()) == [1, 16, 1280]
        assert list(f.get_slice("image_proj.proj_out.weight").get_shape()) == [2048, 1280]
        assert list(f.get_slice("image_proj.proj_in.weight").get_shape()) == [1280, 1280]  # ViT-H width in
    flux = FluxTransformer2DModel.load_config(m["flux"] / "transformer")
    assert flux["num_attention_heads"] * flux["attention_head_dim"] == 3072
    assert (flux["num_layers"], flux["num_single_layers"]) == (1, 1)
    aligner = ImplicitAligner.load_official(m["aligner"])
    assert aligner.dims == {"guidance_dim": 5120, "dim": 2048, "depth": 4, "heads": 20, "dim_head": 64, "ff_mult": 4}


@pytest.mark.slow
@pytest.mark.real_width
def test_img_demo_real_width_runs_every_stage(real_width_models, tmp_path):
    """``img-demo --real-width``: finetune -> preprocess -> train -> eval at the real widths."""
    from img_lightning.cache import CacheView
    from preprocessing.demo import main

    out = tmp_path / "demo"
    (out / "real_width").mkdir(parents=True)
    (out / "real_width" / "models").symlink_to(real_width_models["llava"].parent)  # built once per module
    assert main(["--real-width", "--out", str(out), "-q"]) == 0
    root = out / "real_width"
    view = CacheView.open(root / "cache" / "train")
    assert view.guidance_dim == 5120 and view.ip_shape == (16, 2048) and view.guidance_dtype == torch.bfloat16
    assert int(view.num_tokens.min()) > 576  # every image token and the question
    export = json.loads((root / "runs" / "real-width" / "export" / "aligner.json").read_text())
    assert (export["guidance_dim"], export["dim"], export["depth"], export["heads"]) == (5120, 2048, 4, 20)
    assert (root / "runs" / "real-width-mllm" / "export" / "config.json").is_file()
    assert (root / "eval" / "report" / "index.html").is_file()
    assert len(list((root / "eval").rglob("*.png"))) >= 3  # base, control, IMG
