"""IP and MLLM encoders on the tiny models: pipeline equivalence, batching, templates, errors."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from img_lightning.config.encoders import IPEncoderConfig, MLLMConfig
from img_lightning.encoders.ip import build_ip_encoder
from img_lightning.encoders.mllm import GuidanceEncoder, build_question, expand_to_square, template_id_for
from img_lightning.encoders.templates import templates
from img_lightning.models import ModelNotFoundError
from img_lightning.tiny.ip_adapter import SDXL_PLUS_SUBFOLDER, SDXL_PLUS_WEIGHT

COLOURS = [(230, 20, 20), (20, 20, 230), (20, 200, 40), (240, 220, 30)]


def _images():
    sizes = [(64, 48), (40, 64), (64, 64), (80, 30)]
    out = []
    for (w, h), colour in zip(sizes, COLOURS, strict=True):
        im = Image.new("RGB", (w, h), (250, 250, 250))
        im.paste(colour, (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
        out.append(im)
    return out


def _ip_cfg(root, **kw):
    return OmegaConf.structured(IPEncoderConfig(image_encoder_path=str(root), adapter_path=str(root),
                                                dtype="float32", device="cpu", **kw))


def test_ip_encoder_matches_pipeline_path(tiny_sdxl_dir, tiny_ip_adapter_dir):
    """Our direct conversion gives exactly the tokens of pipe.load_ip_adapter + encoder_hid_proj."""
    from diffusers import StableDiffusionXLPipeline

    enc = build_ip_encoder(_ip_cfg(tiny_ip_adapter_dir, batch_size=3))
    assert (enc.num_tokens, enc.dim) == (16, 64)
    images = _images()
    tokens = enc.encode(images)
    assert tokens.shape == (4, 16, 64) and tokens.dtype == torch.float32

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.load_ip_adapter(str(tiny_ip_adapter_dir), subfolder=SDXL_PLUS_SUBFOLDER, weight_name=SDXL_PLUS_WEIGHT,
                         image_encoder_folder="models/image_encoder")
    pos, neg = pipe.encode_image(images, "cpu", 1, output_hidden_states=True)
    proj = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    with torch.no_grad():
        torch.testing.assert_close(proj(pos), tokens, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(proj(neg[:1])[0], enc.unconditional(), rtol=1e-5, atol=1e-6)
    # images differ -> tokens differ (the tiny world carries signal)
    assert (tokens[0] - tokens[1]).abs().mean() > 1e-3


def test_ip_encoder_batch_independent(tiny_ip_adapter_dir):
    enc = build_ip_encoder(_ip_cfg(tiny_ip_adapter_dir, batch_size=4))
    images = _images()
    batched = enc.encode(images)
    single = torch.cat([enc.encode([im]) for im in images])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_ip_encoder_autocast_flag(tiny_ip_adapter_dir):
    """``encoders.ip.autocast`` (the released SDXL ``get_ip_feat``): features under ``torch.autocast`` in
    the encoder's dtype, unconditional tokens outside it; in float32 it changes nothing."""
    from img_lightning.evaluation.pipeline import resolve_config

    images = _images()
    plain = build_ip_encoder(_ip_cfg(tiny_ip_adapter_dir))
    auto = build_ip_encoder(_ip_cfg(tiny_ip_adapter_dir, autocast=True))
    assert torch.equal(auto.encode(images), plain.encode(images))
    assert torch.equal(auto.unconditional(), plain.unconditional())
    half = build_ip_encoder(OmegaConf.merge(_ip_cfg(tiny_ip_adapter_dir, autocast=True), {"dtype": "bfloat16"}))
    seen = []
    half.projection.register_forward_pre_hook(lambda module, args: seen.append(torch.is_autocast_enabled("cpu")))
    tokens, uncond = half.encode(images), half.unconditional()
    assert seen == [True, False]  # encode: one batch under autocast; the unconditional tokens without
    assert tokens.dtype == torch.float32 and torch.isfinite(tokens).all() and torch.isfinite(uncond).all()
    torch.testing.assert_close(tokens, plain.encode(images), rtol=0.1, atol=0.05)  # bf16 of the same numbers
    # the SDXL backbones get it from their recipe (the released SDXL demo), FLUX's XLabs encoder does not
    for name, want in (("sdxl", True), ("sdxl_dpo", True), ("flux", False)):
        cfg = resolve_config([f"configs/eval/backbones/{name}.yaml"], allow_missing=True)
        assert cfg.encoders.ip.autocast is want, name


def test_ip_encoder_flux_kind(tmp_path):
    from img_lightning.tiny.ip_adapter import FLUX_WEIGHT, build_tiny_ip_adapter_flux

    root = build_tiny_ip_adapter_flux(tmp_path / "flux")
    cfg = OmegaConf.structured(IPEncoderConfig(
        kind="flux_xlabs", image_encoder="openai/clip-vit-large-patch14", image_encoder_subfolder="",
        adapter="XLabs-AI/flux-ip-adapter", adapter_subfolder="", adapter_weight_name=FLUX_WEIGHT,
        image_encoder_path=str(root / "image_encoder"), adapter_path=str(root), dtype="float32", device="cpu"))
    enc = build_ip_encoder(cfg)
    assert (enc.num_tokens, enc.dim) == (4, 4096)  # XLabs v1: ImageProjModel(4096, 768, 4)
    tokens = enc.encode(_images()[:2])
    assert tokens.shape == (2, 4, 4096) and torch.isfinite(tokens).all()
    black = enc.encode([Image.new("RGB", (50, 70), (0, 0, 0))])[0]
    torch.testing.assert_close(enc.unconditional(), black)


def test_missing_models_give_one_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"h94/IP-Adapter.*(hf download|image_encoder_path)"):
        build_ip_encoder(OmegaConf.structured(IPEncoderConfig()))
    with pytest.raises(ModelNotFoundError, match="encoders.mllm.path"):
        GuidanceEncoder.from_config(OmegaConf.structured(MLLMConfig(path=str(tmp_path / "nope"))))
    with pytest.raises(ModelNotFoundError, match="llava-hf/llava-1.5-13b-hf"):
        GuidanceEncoder.from_config(OmegaConf.structured(MLLMConfig()))
    empty = tmp_path / "empty_adapter"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        build_ip_encoder(_ip_cfg(empty))


@pytest.mark.parametrize("backend", ["llava", "qwen2_5_vl"])
def test_guidance_batched_equals_single(backend, tiny_llava_dir, tiny_qwen_dir):
    path = tiny_llava_dir if backend == "llava" else tiny_qwen_dir
    cfg = OmegaConf.structured(MLLMConfig(backend=backend, path=str(path), dtype="float32", device="cpu",
                                          batch_size=4))
    enc = GuidanceEncoder.from_config(cfg)
    assert enc.hidden_size == 64
    images = _images()
    prompts = ["a red square", "a large blue square on a white background next to a small yellow star",
               "green", "a yellow square {with braces}"]
    tids = [template_id_for(f"pair{i}") for i in range(4)]
    batched = enc.encode(images, prompts, tids)
    single = [enc.encode([im], [p], [t])[0] for im, p, t in zip(images, prompts, tids, strict=True)]
    lengths = {b.shape[0] for b in batched}
    assert len(lengths) > 1  # the batch really was padded
    for b, s in zip(batched, single, strict=True):
        assert b.shape == s.shape and b.shape[1] == 64 and b.dtype == torch.float32
        torch.testing.assert_close(b, s, rtol=1e-4, atol=1e-4)
    # exactly the real tokens: the processor's own count for that sample alone
    alone = enc.prepare(images[1:2], prompts[1:2], tids[1:2])
    assert batched[1].shape[0] == int(alone["input_ids"].shape[1])
    # the image matters
    swapped = enc.encode([images[1]], [prompts[0]], [tids[0]])[0]
    assert (swapped - batched[0]).abs().max() > 1e-4


def test_guidance_layer_selection(tiny_llava_dir):
    base = dict(backend="llava", path=str(tiny_llava_dir), dtype="float32", device="cpu")
    last = GuidanceEncoder.from_config(OmegaConf.structured(MLLMConfig(layer=-1, **base)))
    first = GuidanceEncoder.from_config(OmegaConf.structured(MLLMConfig(layer=1, **base)))
    im, p = _images()[:1], ["a red square"]
    a, b = last.encode(im, p, [0])[0], first.encode(im, p, [0])[0]
    assert a.shape == b.shape and (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="out of range"):
        GuidanceEncoder.from_config(OmegaConf.structured(MLLMConfig(layer=7, **base)))
    with pytest.raises(ValueError, match="expects a 'qwen2_5_vl' model"):
        GuidanceEncoder.from_config(OmegaConf.structured(MLLMConfig(**{**base, "backend": "qwen2_5_vl"})))


def test_pad_to_square_matches_llava_rule():
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    sq = expand_to_square(im, (122, 116, 104))
    assert sq.size == (40, 40)
    arr = np.asarray(sq)
    assert tuple(arr[0, 0]) == (122, 116, 104) and tuple(arr[39, 39]) == (122, 116, 104)
    assert tuple(arr[10, 0]) == (255, 0, 0) and tuple(arr[29, 39]) == (255, 0, 0)  # rows 10..29
    assert tuple(arr[9, 5]) == (122, 116, 104) and tuple(arr[30, 5]) == (122, 116, 104)
    tall = expand_to_square(Image.new("RGB", (11, 20), (0, 0, 255)), (1, 2, 3))
    assert tall.size == (20, 20) and tuple(np.asarray(tall)[5, 4]) == (0, 0, 255)  # left margin (20-11)//2 = 4
    assert tuple(np.asarray(tall)[5, 3]) == (1, 2, 3)


def test_guidance_pad_mode_uses_processor_mean(tiny_llava_dir):
    base = dict(backend="llava", path=str(tiny_llava_dir), dtype="float32", device="cpu")
    pad = GuidanceEncoder.from_config(OmegaConf.structured(MLLMConfig(image_mode="pad", **base)))
    proc = GuidanceEncoder.from_config(OmegaConf.structured(MLLMConfig(image_mode="processor", **base)))
    assert pad.pad_fill == (122, 116, 104)  # int(CLIP mean x 255), LLaVA's rule
    wide = _images()[3]
    a, b = pad.encode([wide], ["x"], [0])[0], proc.encode([wide], ["x"], [0])[0]
    assert a.shape == b.shape and (a - b).abs().max() > 1e-4  # padding changed what the model saw


def test_prompt_formats(tiny_llava_dir, tiny_qwen_dir):
    from img_lightning.encoders.mllm import LLAVA_V1_SYSTEM

    base = dict(backend="llava", path=str(tiny_llava_dir), dtype="float32", device="cpu")
    auto = GuidanceEncoder.from_config(OmegaConf.structured(MLLMConfig(**base)))
    assert auto.prompt_format == "llava_v1"
    assert auto.chat_text("Q?") == f"{LLAVA_V1_SYSTEM} USER: <image>\nQ? ASSISTANT:"
    chat = GuidanceEncoder.from_config(OmegaConf.structured(MLLMConfig(prompt_format="chat_template", **base)))
    assert chat.chat_text("Q?") == "USER: <image>\nQ? ASSISTANT:"
    a, b = auto.encode(_images()[:1], ["x"], [0])[0], chat.encode(_images()[:1], ["x"], [0])[0]
    assert a.shape[0] > b.shape[0]  # the system line is part of the real tokens
    qwen = dict(backend="qwen2_5_vl", path=str(tiny_qwen_dir), dtype="float32", device="cpu")
    assert GuidanceEncoder.from_config(OmegaConf.structured(MLLMConfig(**qwen))).prompt_format == "chat_template"
    with pytest.raises(ValueError, match="llava_v1"):
        GuidanceEncoder.from_config(OmegaConf.structured(MLLMConfig(prompt_format="llava_v1", **qwen)))


def test_templates_are_deterministic_and_well_formed():
    items = templates("img-v1")
    assert 95 <= len(items) <= 110 and len(set(items)) == len(items)
    assert all(t.count("{prompt}") == 1 for t in items)
    ids = [template_id_for(f"pair-{i}") for i in range(2000)]
    assert ids == [template_id_for(f"pair-{i}") for i in range(2000)]
    assert len(set(ids)) == len(items)  # every template gets used
    # stable across processes and Python versions: sha256-based, pinned values
    import hashlib

    expect = int.from_bytes(hashlib.sha256(b"img-v1:abc").digest()[:8], "big") % len(items)
    assert template_id_for("abc") == expect
    q = build_question("  a {cat} on a mat ", 0)
    assert q == items[0].replace("{prompt}", "a {cat} on a mat")
    with pytest.raises(ValueError):
        build_question("x", len(items))
    with pytest.raises(ValueError, match="unknown template set"):
        template_id_for("abc", "img-v9")


def test_template_choice_is_independent_of_python_hash_seed(tmp_path):
    import subprocess
    import sys

    code = "from img_lightning.encoders.templates import template_id_for as t; print([t(f'p{i}') for i in range(50)])"
    outs = set()
    for seed in ("1", "2"):
        env = {"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"}
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout)
    assert len(outs) == 1
