"""Generation pieces: IP tokens injected after the adapter's projection, seeds, the image store."""

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from img_lightning.config.eval import IPAdapterConfig, PipelineConfig, SamplerConfig
from img_lightning.generation.conditioner import pad_guidance
from img_lightning.generation.ip_inject import PassThroughIPProjection
from img_lightning.generation.pipeline import DiffusionBackend
from img_lightning.generation.seeds import seed_for
from img_lightning.generation.store import ImageStore

WEIGHT = "ip-adapter-plus_sdxl_vit-h.safetensors"


def _sampler(**kw):
    return OmegaConf.merge(OmegaConf.structured(SamplerConfig), dict(steps=2, height=64, width=64, **kw))


@pytest.fixture(scope="module")
def backend(tiny_sdxl_dir, tiny_ip_adapter_dir):
    cfg = OmegaConf.merge(OmegaConf.structured(PipelineConfig), dict(path=str(tiny_sdxl_dir), device="cpu", dtype="float32"))
    b = DiffusionBackend.from_config(cfg)
    ipa = OmegaConf.merge(OmegaConf.structured(IPAdapterConfig), dict(path=str(tiny_ip_adapter_dir)))
    b.load_ip_adapter(ipa)
    return b


def test_aligned_tokens_enter_after_the_projection(backend, tiny_sdxl_dir, tiny_ip_adapter_dir):
    """Our tokens (IPEncoder output) through the pass-through give exactly the image diffusers
    makes from the raw picture with its own encoder + projection: same injection point."""
    from diffusers import StableDiffusionXLPipeline

    from img_lightning.config.encoders import IPEncoderConfig
    from img_lightning.encoders.ip import build_ip_encoder

    ref = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    ref.load_ip_adapter(str(tiny_ip_adapter_dir), subfolder="sdxl_models", weight_name=WEIGHT,
                        image_encoder_folder="models/image_encoder")
    ref.set_ip_adapter_scale(0.8)
    ref.set_progress_bar_config(disable=True)
    cond = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    want = ref("a red circle", ip_adapter_image=cond, num_inference_steps=2, height=64, width=64, guidance_scale=7.5,
               generator=torch.Generator("cpu").manual_seed(5), output_type="np").images[0]

    enc = build_ip_encoder(OmegaConf.merge(OmegaConf.structured(IPEncoderConfig), dict(
        image_encoder_path=str(tiny_ip_adapter_dir), adapter_path=str(tiny_ip_adapter_dir), dtype="float32", device="cpu")))
    assert isinstance(backend.pipe.unet.encoder_hid_proj, PassThroughIPProjection)
    assert backend.token_width() == enc.dim == 64
    backend.set_ip_scale(0.8)
    got = backend.generate(["a red circle"], [5], _sampler(), ip_tokens=enc.encode([cond]),
                           negative_ip_tokens=enc.unconditional())[0]
    np.testing.assert_allclose(np.asarray(got, dtype=np.float32) / 255, want, atol=1.5 / 255)
    # the same tokens re-projected (what happens without the pass-through) change the image
    backend.set_ip_scale(0.0)
    zero = np.asarray(backend.generate(["a red circle"], [5], _sampler(), ip_tokens=enc.encode([cond]))[0])
    assert np.abs(zero.astype(int) - np.asarray(got).astype(int)).max() > 0


def test_passthrough_shapes():
    proj = PassThroughIPProjection(torch.nn.Module())
    proj.original.image_projection_layers = torch.nn.ModuleList([torch.nn.Identity()])
    t = torch.randn(2, 16, 8)
    out = proj([t])
    assert out[0].shape == (2, 1, 16, 8) and torch.equal(out[0][:, 0], t)
    with pytest.raises(ValueError, match="1 are loaded"):
        proj([t, t])


def test_seed_per_prompt_is_independent_of_the_batch(backend):
    backend.set_ip_scale(0.2)
    tok = torch.randn(2, 16, 64)
    pair = backend.generate(["a cat", "a dog"], [seed_for("a", 0), seed_for("b", 0)], _sampler(), ip_tokens=tok)
    alone = backend.generate(["a dog"], [seed_for("b", 0)], _sampler(), ip_tokens=tok[1:])
    other = backend.generate(["a dog"], [seed_for("c", 0)], _sampler(), ip_tokens=tok[1:])
    diff = np.abs(np.asarray(pair[1], dtype=int) - np.asarray(alone[0], dtype=int))
    # batched CPU kernels round differently (a few levels at most); another seed is a different image
    assert diff.mean() < 2.0 and diff.max() <= 16
    assert np.abs(np.asarray(other[0], dtype=int) - np.asarray(alone[0], dtype=int)).mean() > 5 * max(diff.mean(), 0.1)
    assert seed_for("a", 0) == seed_for("a", 0) != seed_for("a", 1)
    with pytest.raises(ValueError, match="pass ip_tokens"):
        backend.generate(["x"], [1], _sampler())


def test_store_resume_semantics(tmp_path):
    s = ImageStore(tmp_path, "base", "0of1")
    im = Image.new("RGB", (8, 8), (1, 2, 3))
    s.save("00001", im, {"seed": 3})
    s.path_for("00002").parent.mkdir(parents=True, exist_ok=True)
    im.save(s.path_for("00002"))  # image written, killed before its metadata line
    with s.meta_file.open("a") as f:
        f.write('{"uid": "00003", "arm"')  # a line cut by a kill
    fresh = ImageStore(tmp_path, "base", "1of2")  # another chunk sees the same arm
    assert fresh.pending(["00001", "00002", "00003"]) == ["00002", "00003"]
    assert json.loads(s.meta_file.read_text().splitlines()[0])["file"] == "images/base/00001.png"
    assert fresh.load("00001").getpixel((0, 0)) == (1, 2, 3)
    assert not list(s.dir.glob(".*tmp*"))


def test_pad_guidance():
    h, m = pad_guidance([torch.ones(3, 4), torch.ones(5, 4) * 2])
    assert h.shape == (2, 5, 4) and m.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert h[0, 3:].abs().sum() == 0
