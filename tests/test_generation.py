"""Generation pieces: IP tokens injected after the adapter's projection, seeds, the image store, and
the released SDXL demo (demo_sdxl.py / IP-Adapter's ``generate_from_feat``) re-implemented
independently on the tiny SDXL + the tiny adapter file."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from img_lightning.config.eval import EvalConfig, IPAdapterConfig, PipelineConfig, SamplerConfig
from img_lightning.config.loading import load_config
from img_lightning.eval_run import ImageStore
from img_lightning.generation.conditioner import pad_guidance
from img_lightning.generation.ip_inject import PassThroughIPProjection
from img_lightning.generation.pipeline import DiffusionBackend
from img_lightning.generation.seeds import seed_for

WEIGHT = "ip-adapter-plus_sdxl_vit-h.safetensors"
REPO = Path(__file__).resolve().parents[1]


def _sampler(**kw):
    return OmegaConf.merge(OmegaConf.structured(SamplerConfig), dict(steps=2, height=64, width=64, **kw))


@pytest.fixture(scope="module")
def backend(tiny_sdxl_dir, tiny_ip_adapter_dir):
    cfg = OmegaConf.merge(OmegaConf.structured(PipelineConfig),
                          dict(path=str(tiny_sdxl_dir), device="cpu", dtype="float32"))
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
        image_encoder_path=str(tiny_ip_adapter_dir), adapter_path=str(tiny_ip_adapter_dir), dtype="float32",
        device="cpu")))
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


def test_with_the_adapter_loaded_an_image_without_tokens_is_the_pipelines_own(backend, tiny_sdxl_dir):
    """A base image can be made after the IP-Adapter is loaded (img-generate alternates base images
    and re-generations): IP scale 0 in both CFG halves is bit for bit the pipeline without it."""
    cfg = OmegaConf.merge(OmegaConf.structured(PipelineConfig),
                          dict(path=str(tiny_sdxl_dir), device="cpu", dtype="float32"))
    plain = DiffusionBackend.from_config(cfg)
    assert backend.ip_loaded and not plain.ip_loaded
    backend.set_ip_scale(0.2)
    for negative in (None, "blurry"):
        got = backend.generate(["a cat", "a dog"], [3, 4], _sampler(), negative_prompt=negative, output_type="np")
        want = plain.generate(["a cat", "a dog"], [3, 4], _sampler(), negative_prompt=negative, output_type="np")
        assert np.array_equal(got, want)
    assert backend.ip_scale == 0.2  # the IMG arm's scale is back
    with_tokens = backend.generate(["a cat"], [3], _sampler(), ip_tokens=torch.randn(1, 16, 64), output_type="np")
    assert np.abs(with_tokens - want[:1]).max() > 1e-3  # the adapter is really there


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


# ---------------------------------------------------------------- the released SDXL demo
class TencentIPAttn(torch.nn.Module):
    """IP-Adapter's ``IPAttnProcessor2_0``: the last ``num_tokens`` context tokens are image tokens,
    attended with their own ``to_k_ip``/``to_v_ip`` and added at ``scale`` before ``to_out``."""

    def __init__(self, to_k_ip, to_v_ip, scale, num_tokens=16):
        super().__init__()
        self.k, self.v, self.scale, self.n = to_k_ip, to_v_ip, scale, num_tokens

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        assert hidden_states.ndim == 3 and attn.spatial_norm is None and attn.group_norm is None
        assert not attn.norm_cross and not attn.residual_connection and attn.rescale_output_factor == 1
        b = hidden_states.shape[0]
        text, ip = encoder_hidden_states[:, :-self.n], encoder_hidden_states[:, -self.n:]

        def heads(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q = heads(attn.to_q(hidden_states))
        out = F.scaled_dot_product_attention(q, heads(attn.to_k(text)), heads(attn.to_v(text)))
        ip_out = F.scaled_dot_product_attention(q, heads(F.linear(ip, self.k)), heads(F.linear(ip, self.v)))
        out = (out + self.scale * ip_out).transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[3])
        return attn.to_out[1](attn.to_out[0](out))


def _split_heads(t, heads):
    """``[B, T, heads * 64]`` -> ``[B, heads, T, 64]``."""
    return t.view(t.shape[0], t.shape[1], heads, 64).transpose(1, 2)


def ip_adapter_resampler(sd, x):
    """IP-Adapter-Plus ``Resampler.forward`` from its state dict (heads of 64, scores (q s)(k s)^T with
    s = 64^-1/4, float32 softmax, LayerNorm eps 1e-5, GELU feed-forward)."""
    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"])

    latents = sd["latents"].repeat(x.shape[0], 1, 1)
    x = F.linear(x, sd["proj_in.weight"], sd["proj_in.bias"])
    depth = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    for i in range(depth):
        p = f"layers.{i}.0"
        xn, lat = ln(x, f"{p}.norm1"), ln(latents, f"{p}.norm2")
        q = F.linear(lat, sd[f"{p}.to_q.weight"])
        k, v = F.linear(torch.cat([xn, lat], dim=-2), sd[f"{p}.to_kv.weight"]).chunk(2, dim=-1)
        h = q.shape[-1] // 64
        s = 1 / math.sqrt(math.sqrt(64))
        w = ((_split_heads(q, h) * s) @ (_split_heads(k, h) * s).transpose(-2, -1)).float().softmax(dim=-1)
        out = (w @ _split_heads(v, h)).transpose(1, 2).reshape(q.shape)
        latents = F.linear(out, sd[f"{p}.to_out.weight"]) + latents
        f = f"layers.{i}.1"
        latents = F.linear(F.gelu(F.linear(ln(latents, f"{f}.0"), sd[f"{f}.1.weight"])), sd[f"{f}.3.weight"]) + latents
    return ln(F.linear(latents, sd["proj_out.weight"], sd["proj_out.bias"]), "norm_out")


def released_ip_pipe(sdxl_dir, adapter_file, scale):
    """demo_sdxl.py's ``IPAdapterPlusXL(pipe, ...)``: IP processors on every cross-attention, loaded by
    their index in ``unet.attn_processors`` (``ip_adapter.{i}.to_{k,v}_ip``)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    sd = load_file(str(adapter_file))
    procs = dict(pipe.unet.attn_processors)
    for i, name in enumerate(list(procs)):
        if not name.endswith("attn1.processor"):
            procs[name] = TencentIPAttn(sd[f"ip_adapter.{i}.to_k_ip.weight"], sd[f"ip_adapter.{i}.to_v_ip.weight"],
                                        scale)
    pipe.unet.set_attn_processor(procs)
    return pipe


@torch.no_grad()
def generate_from_feat(pipe, image_encoder, resampler_sd, feat, prompt, seed, steps, guidance_scale,
                       pass_negative_prompt=False):
    """``IPAdapterPlusXL.generate_from_feat`` (ip_adapter_fp16.py): unconditional tokens from CLIP on
    zero pixels through the adapter's resampler; ``encode_prompt(prompt, do_classifier_free_guidance=True)``
    - its negative_prompt default is built but not passed - then IP tokens appended to both halves."""
    size = image_encoder.config.image_size  # 224 in the demo (ViT-H); the tiny tower's own size here
    uncond = ip_adapter_resampler(resampler_sd, image_encoder(
        torch.zeros(feat.shape[0], 3, size, size), output_hidden_states=True).hidden_states[-2])
    released_negative = ["monochrome, lowres, bad anatomy, worst quality, low quality"]
    extra = {"negative_prompt": released_negative} if pass_negative_prompt else {}
    pe, npe, pooled, npooled = pipe.encode_prompt([prompt], num_images_per_prompt=1, do_classifier_free_guidance=True,
                                                  **extra)
    return pipe(prompt_embeds=torch.cat([pe, feat], dim=1), negative_prompt_embeds=torch.cat([npe, uncond], dim=1),
                pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=npooled, num_inference_steps=steps,
                generator=torch.Generator().manual_seed(seed), guidance_scale=guidance_scale, height=64, width=64,
                output_type="np").images[0], uncond


def test_sdxl_backbone_configs_are_the_released_demos():
    for name in ("sdxl", "sdxl_dpo"):
        cfg = load_config(EvalConfig, [REPO / f"configs/eval/backbones/{name}.yaml"], [], require_complete=False)
        s, img = cfg.generation.sampler, cfg.img
        assert (s.steps, s.guidance_scale, s.height, s.width) == (50, 7.5, 1024, 1024)
        assert cfg.generation.base.negative_prompt is None and img.negative_prompt is None
        assert (img.ip_scale, img.negative_ip_image.value, img.negative_ip_scale) == (0.2, "zero_pixels", None)
        assert (s.true_cfg_scale, s.true_cfg_start_step) == (1.0, 0) and img.aligner.passes == 3
    assert cfg.generation.pipeline.unet == "mhdang/dpo-sdxl-text2image-v1"


def test_sdxl_base_and_regeneration_match_the_released_demo(backend, tiny_sdxl_dir, tiny_ip_adapter_dir):
    """Base image = the demo's ``sdxl_pipe(prompt, generator=Generator().manual_seed(seed), ...)``;
    IMG re-generation = ``generate_from_feat(feat, scale=0.2, prompt, seed, guidance_scale=7.5)``."""
    from transformers import CLIPVisionModelWithProjection

    from img_lightning.config.encoders import IPEncoderConfig
    from img_lightning.encoders.ip import build_ip_encoder

    cfg = load_config(EvalConfig, [REPO / "configs/eval/backbones/sdxl.yaml"], [
        f"generation.pipeline.path={tiny_sdxl_dir}", "generation.pipeline.device=cpu",
        "generation.pipeline.dtype=float32", "generation.pipeline.variant=null", "generation.sampler.steps=3",
        "generation.sampler.height=64", "generation.sampler.width=64"], require_complete=False)
    s, img = cfg.generation.sampler, cfg.img
    prompt, seed = "a red circle next to a blue square", 306
    ref_ip = released_ip_pipe(tiny_sdxl_dir, tiny_ip_adapter_dir / "sdxl_models" / WEIGHT, img.ip_scale)

    # base: the plain pipeline, no negative prompt (the demo's sdxl_pipe has no IP-Adapter)
    plain = DiffusionBackend.from_config(cfg.generation.pipeline)
    base = plain.generate([prompt], [seed], s, negative_prompt=cfg.generation.base.negative_prompt, output_type="np")[0]
    from diffusers import StableDiffusionXLPipeline

    ref = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    want = ref(prompt, generator=torch.Generator().manual_seed(seed), num_inference_steps=s.steps,
               guidance_scale=s.guidance_scale, height=64, width=64, output_type="np").images[0]
    np.testing.assert_allclose(base, want, atol=1e-5)

    # re-generation from (random stand-ins for) aligned tokens
    torch.manual_seed(0)
    feat = torch.randn(1, 16, 64)
    tower = CLIPVisionModelWithProjection.from_pretrained(tiny_ip_adapter_dir / "models/image_encoder").eval()
    resampler_sd = {k[len("image_proj."):]: v for k, v in load_file(
        str(tiny_ip_adapter_dir / "sdxl_models" / WEIGHT)).items() if k.startswith("image_proj.")}
    want, uncond = generate_from_feat(ref_ip, tower, resampler_sd, feat, prompt, seed, s.steps, s.guidance_scale)
    enc = build_ip_encoder(OmegaConf.merge(OmegaConf.structured(IPEncoderConfig), dict(
        image_encoder_path=str(tiny_ip_adapter_dir), adapter_path=str(tiny_ip_adapter_dir), dtype="float32",
        device="cpu")))
    torch.testing.assert_close(enc.unconditional(img.negative_ip_image.value), uncond[0], rtol=1e-5, atol=1e-5)
    backend.set_ip_scale(img.ip_scale)
    ours = backend.generate([prompt], [seed], s, negative_prompt=img.negative_prompt, ip_tokens=feat,
                            negative_ip_tokens=enc.unconditional(img.negative_ip_image.value),
                            negative_ip_scale=img.negative_ip_scale, output_type="np")
    np.testing.assert_allclose(ours[0], want, atol=1e-5)
    # not vacuous: other tokens, or the negative prompt generate_from_feat builds but never passes,
    # change the image
    for changed in (dict(feat=-feat), dict(pass_negative_prompt=True)):
        args = {"feat": feat, "pass_negative_prompt": False, **changed}
        other, _ = generate_from_feat(ref_ip, tower, resampler_sd, args["feat"], prompt, seed, s.steps,
                                      s.guidance_scale, pass_negative_prompt=args["pass_negative_prompt"])
        assert np.abs(other - want).max() > 1e-2, changed
    # control arm = these settings at IP scale 0: nothing else differs from the base image
    backend.set_ip_scale(0.0)
    control = backend.generate([prompt], [seed], s, negative_prompt=img.negative_prompt, ip_tokens=feat,
                               negative_ip_tokens=enc.unconditional(img.negative_ip_image.value), output_type="np")
    np.testing.assert_allclose(control[0], base, atol=1e-5)
    with pytest.raises(ValueError, match="one IP scale"):
        backend.generate([prompt], [seed], s, ip_tokens=feat, negative_ip_scale=0.5)


# ---------------------------------------------------------------- what each arm asks the pipeline for
class _RecordingBackend:
    """Stands in for DiffusionBackend: records each generate call's settings."""

    kind = "flux"

    def __init__(self):
        self.calls, self.ip_loaded, self.ip_scale = [], False, None

    def load_ip_adapter(self, cfg):
        self.ip_loaded = True

    def token_width(self):
        return 8

    def set_ip_scale(self, scale):
        self.ip_scale = scale

    def generate(self, prompts, seeds, sampler, negative_prompt=None, ip_tokens=None, negative_ip_tokens=None,
                 negative_ip_scale=None):
        self.calls.append(dict(negative_prompt=negative_prompt,
                               ip_scale=self.ip_scale if ip_tokens is not None else None,
                               negative_ip_scale=negative_ip_scale, negative_ip=negative_ip_tokens,
                               true_cfg=(sampler.true_cfg_scale, sampler.true_cfg_start_step)))
        return [Image.new("RGB", (8, 8), (len(self.calls), 0, 0)) for _ in prompts]

    def close(self):
        pass


class _FakeIP:
    def __init__(self):
        self.modes = []

    def unconditional(self, mode):
        self.modes.append(mode)
        return torch.full((4, 8), float(len(mode)))


class _FakeConditioner:
    def __init__(self):
        self.ip = _FakeIP()

    def check_dims(self, width):
        pass

    def template_id(self, key):
        return 0

    def align(self, images, prompts, tids, passes):
        return torch.zeros(len(images), 4, 8), torch.ones(len(images), 4, 8)

    def release_encoders(self):
        pass


def test_each_arm_gets_its_released_settings(tmp_path):
    """base: generation.base; IMG rounds: img.* at img.ip_scale; control: the same at IP scale 0."""
    from img_lightning.config.loading import ConfigError
    from img_lightning.eval_run import PromptRecord
    from img_lightning.generation.runner import GenerationRun

    cfg = load_config(EvalConfig, [REPO / "configs/eval/backbones/flux.yaml"], [
        "img.aligner.checkpoint=x.pth", "prompts.name=p", "prompts.format=text", "prompts.path=x"],
        require_complete=False)
    cfg.generation.base.negative_prompt = "base-neg"
    cfg.img.negative_prompt = "regen-neg"
    run = GenerationRun(cfg, [PromptRecord("00000", "a cat")], tmp_path, progress=False)
    recorder = run._backend = _RecordingBackend()
    run._conditioner = _FakeConditioner()
    run.run()
    base, img, control = recorder.calls
    assert base == dict(negative_prompt="base-neg", ip_scale=None, negative_ip_scale=None, negative_ip=None,
                        true_cfg=(3.5, 1))
    black = torch.full((4, 8), float(len("black")))
    assert img.pop("negative_ip").equal(black) and control.pop("negative_ip").equal(black)
    assert img == dict(negative_prompt="regen-neg", ip_scale=0.2, negative_ip_scale=0.2, true_cfg=(3.5, 1))
    assert control == dict(negative_prompt="regen-neg", ip_scale=0.0, negative_ip_scale=0.2, true_cfg=(3.5, 1))
    assert run._conditioner.ip.modes == ["black"]  # computed once, then read from the run folder
    meta = json.loads((tmp_path / "metadata" / "control.0of1.jsonl").read_text())
    assert (meta["negative_ip_image"], meta["negative_ip_scale"], meta["shift"]) == ("black", 0.2, "xlabs")
    # settings SDXL cannot honour are one clear error
    sdxl = load_config(EvalConfig, [REPO / "configs/eval/backbones/sdxl.yaml"], ["img.negative_ip_scale=0.2"],
                       require_complete=False)
    with pytest.raises(ConfigError, match="negative_ip_scale is FLUX-only"):
        GenerationRun(sdxl, [], tmp_path / "x")


def test_with_the_released_sdxl_settings_control_reuses_the_base_images(tmp_path):
    """SDXL's control (IP scale 0, the same negative prompt) is the base image: copied, not generated,
    and recorded as such; another negative prompt for the re-generation makes it an arm of its own."""
    from img_lightning.eval_run import PromptRecord
    from img_lightning.generation.provenance import same_images_as
    from img_lightning.generation.runner import GenerationRun

    over = ["img.aligner.checkpoint=x.pth", "prompts.name=p", "prompts.format=text", "prompts.path=x"]
    cfg = load_config(EvalConfig, [REPO / "configs/eval/backbones/sdxl.yaml"], over, require_complete=False)
    flux = load_config(EvalConfig, [REPO / "configs/eval/backbones/flux.yaml"], over, require_complete=False)
    assert same_images_as(cfg, "control") == "base" and same_images_as(flux, "control") is None
    prompts = [PromptRecord("00000", "a cat"), PromptRecord("00001", "a dog")]
    recorder = _NoisyBackend()
    run = GenerationRun(cfg, prompts, tmp_path, progress=False)
    run._backend, run._conditioner = recorder, _FakeConditioner()
    assert run.run() == {"base": 2, "control": 2, "img_r1": 2} and run.reused == {"control": "base"}
    assert len(recorder.calls) == 2  # base and the IMG round: no control generation
    for uid in ("00000", "00001"):
        control = (tmp_path / "images/control" / f"{uid}.png").read_bytes()
        assert control == (tmp_path / "images/base" / f"{uid}.png").read_bytes()
    meta = [json.loads(line) for line in (tmp_path / "metadata" / "control.0of1.jsonl").read_text().splitlines()]
    assert all(m["reused_from"] == "base" and m["ip_scale"] == 0.0 for m in meta)
    cfg.img.negative_prompt = "blurry"
    assert same_images_as(cfg, "control") is None
    other = GenerationRun(cfg, prompts, tmp_path / "neg", progress=False)
    recorder = other._backend = _NoisyBackend()
    other._conditioner = _FakeConditioner()
    other.run()
    assert len(recorder.calls) == 3 and other.reused == {}


class _NoisyBackend(_RecordingBackend):
    """Returns random-noise images (what any lossy codec changes) and keeps them."""

    def __init__(self):
        super().__init__()
        self.images = []

    def generate(self, prompts, seeds, sampler, **kwargs):
        super().generate(prompts, seeds, sampler, **kwargs)
        rng = np.random.default_rng(len(self.calls))
        out = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in prompts]
        self.images.append(out)
        return out


class _KeepingConditioner(_FakeConditioner):
    def __init__(self):
        super().__init__()
        self.seen = []

    def align(self, images, prompts, tids, passes):
        self.seen.append(list(images))
        return super().align(images, prompts, tids, passes)


def test_img_features_come_from_the_generated_image_itself(tmp_path):
    """The released demos feed the in-memory image to the MLLM and IP encoder; our rounds read the
    stored PNG, which must be that image pixel for pixel; lossy formats are refused for IMG runs."""
    from img_lightning.config.loading import ConfigError
    from img_lightning.eval_run import PromptRecord
    from img_lightning.generation.runner import GenerationRun

    overrides = ["img.aligner.checkpoint=x.pth", "prompts.name=p", "prompts.format=text", "prompts.path=x"]
    cfg = load_config(EvalConfig, [REPO / "configs/eval/backbones/flux.yaml"], overrides + ["img.rounds=2"],
                      require_complete=False)
    prompts = [PromptRecord("00000", "a cat"), PromptRecord("00001", "a dog")]
    run = GenerationRun(cfg, prompts, tmp_path, progress=False)
    noisy = run._backend = _NoisyBackend()
    run._conditioner = _KeepingConditioner()
    run.run()
    base, round1 = noisy.images[0], noisy.images[1]
    assert len(run._conditioner.seen) == 2  # round 1 from the base images, round 2 from round 1's
    for generated, seen in zip((base, round1), run._conditioner.seen, strict=True):
        for want, got in zip(generated, seen, strict=True):
            assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(want))
    for fmt in ("jpeg", "webp"):
        lossy = load_config(EvalConfig, [REPO / "configs/eval/backbones/flux.yaml"],
                            overrides + [f"generation.image_format={fmt}"], require_complete=False)
        with pytest.raises(ConfigError, match=f"image_format: {fmt} is lossy.*use png"):
            GenerationRun(lossy, prompts, tmp_path / fmt)
        lossy.img.rounds = 0  # base images only: nothing is read back
        GenerationRun(lossy, prompts, tmp_path / fmt)
