"""FLUX generation against the released FLUX demo (demo_flux.py on XLabs' XFluxPipeline).

The reference here re-implements, independently of ``flux_sampler.py`` and of diffusers' IP-Adapter
loading, what XLabs' code does with the tiny FLUX (``img_lightning/tiny/flux.py``) and a tiny XLabs
v1 adapter file: ``HFEmbedder`` text encoding (T5 padded to 512, CLIP pooled), ``get_noise`` +
packing, ``get_schedule(steps, (W // 8) * (H // 8) // 256)``, ``denoise`` (true CFG from
``timestep_to_start_cfg`` with the negative prompt, negative image projection and ``neg_ip_scale``,
Euler ``x += (t_prev - t) * pred``), ``IPDoubleStreamBlockProcessor`` (``img += ip_scale *
sdpa(img_q, k_proj(image_proj), v_proj(image_proj))`` after each double-stream block, weights read
from the file's ``double_blocks.{i}.processor.*`` keys), ``ImageProjModel(4096, 768, 4)`` and the
VAE decode. Shared with our path are only the model weights (text encoders, the plain transformer
without the adapter loaded, the VAE), each run in a separate pipeline object.
"""

import math
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from img_lightning.config.encoders import IPEncoderConfig
from img_lightning.config.eval import EvalConfig, IPAdapterConfig, PipelineConfig, SamplerConfig
from img_lightning.config.loading import load_config
from img_lightning.generation.ip_inject import PassThroughIPProjection
from img_lightning.generation.pipeline import DiffusionBackend

REPO = Path(__file__).resolve().parents[1]
SIZE = 32  # tiny FLUX images (the backbone config's 1024 is overridden)
STEPS = 8  # (and its 30 steps, for time: the loop does not depend on the count; the config test checks 30)
PROMPTS = ["a red circle", "two blue squares on a green field"]
SEEDS = [3, 11]


@pytest.fixture(scope="module")
def flux_world(tmp_path_factory):
    from img_lightning.tiny.flux import build_tiny_flux_world

    return build_tiny_flux_world(tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="module")
def released(flux_world):
    """configs/eval/backbones/flux.yaml pointed at the tiny models."""
    flux_dir, ipa_dir = flux_world
    return load_config(EvalConfig, [REPO / "configs/eval/backbones/flux.yaml"], [
        f"generation.pipeline.path={flux_dir}", "generation.pipeline.device=cpu", "generation.pipeline.dtype=float32",
        f"generation.sampler.height={SIZE}", f"generation.sampler.width={SIZE}", f"img.ip_adapter.path={ipa_dir}",
    ], require_complete=False)


@pytest.fixture(scope="module")
def sampler(released):
    return OmegaConf.merge(released.generation.sampler, dict(steps=STEPS))


@pytest.fixture(scope="module")
def backend(released):
    return DiffusionBackend.from_config(released.generation.pipeline)


# ---------------------------------------------------------------- the XLabs reference
class XLabsIPBlocks:
    """``IPDoubleStreamBlockProcessor`` on a plain diffusers FLUX transformer, via hooks."""

    def __init__(self, transformer, adapter_file: Path) -> None:
        sd = load_file(str(adapter_file))
        self.kv = []
        self.image_proj, self.scale, self._q = None, 0.0, None
        for i, block in enumerate(transformer.transformer_blocks):
            p = f"double_blocks.{i}.processor.ip_adapter_double_stream_"
            names = ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")
            self.kv.append([sd[p + n].float() for n in names])
            block.attn.norm_q.register_forward_hook(self._keep_q)  # img_q after QK-norm, before RoPE
            block.register_forward_hook(self._adder(i))
        assert f"double_blocks.{len(self.kv)}.processor.ip_adapter_double_stream_k_proj.weight" not in sd

    def _keep_q(self, module, args, out):
        self._q = out  # [B, L, H, D]

    def _adder(self, i):
        def hook(module, args, out):
            if self.image_proj is None:
                return out
            wk, bk, wv, bv = self.kv[i]
            b, _, h, d = self._q.shape
            k = F.linear(self.image_proj, wk, bk).view(b, -1, h, d).transpose(1, 2)
            v = F.linear(self.image_proj, wv, bv).view(b, -1, h, d).transpose(1, 2)
            ip = F.scaled_dot_product_attention(self._q.transpose(1, 2), k, v).transpose(1, 2).reshape(b, -1, h * d)
            return out[0], out[1] + self.scale * ip  # FluxTransformerBlock returns (txt, img)
        return hook


def xlabs_image_proj(adapter_file: Path, clip_image_embeds: torch.Tensor) -> torch.Tensor:
    """XLabs' ``ImageProjModel(4096, 768, 4)`` from the file's ``ip_adapter_proj_model.*`` tensors."""
    sd = {k: v.float() for k, v in load_file(str(adapter_file)).items()}
    assert sd["ip_adapter_proj_model.proj.weight"].shape == (4 * 4096, 768)
    tokens = F.linear(clip_image_embeds, sd["ip_adapter_proj_model.proj.weight"], sd["ip_adapter_proj_model.proj.bias"])
    return F.layer_norm(tokens.reshape(-1, 4, 4096), (4096,), sd["ip_adapter_proj_model.norm.weight"],
                        sd["ip_adapter_proj_model.norm.bias"])


def xlabs_black_image_proj(ipa_dir: Path) -> torch.Tensor:
    """The demo's ``get_image_proj(np.zeros((1024, 1024, 3), uint8))``."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    tower = CLIPVisionModelWithProjection.from_pretrained(ipa_dir / "image_encoder").eval()
    pixels = CLIPImageProcessor.from_pretrained(ipa_dir / "image_encoder")(
        images=np.zeros((1024, 1024, 3), dtype=np.uint8), return_tensors="pt").pixel_values
    with torch.no_grad():
        return xlabs_image_proj(ipa_dir / "ip_adapter.safetensors", tower(pixels).image_embeds)


def xlabs_embed(pipe, prompt: str):
    """``HFEmbedder``: T5 last_hidden_state over 512 padded tokens, CLIP pooler_output over 77."""
    t5 = pipe.tokenizer_2(prompt, truncation=True, max_length=512, padding="max_length", return_tensors="pt")
    clip = pipe.tokenizer(prompt, truncation=True, max_length=77, padding="max_length", return_tensors="pt")
    return pipe.text_encoder_2(t5.input_ids).last_hidden_state, pipe.text_encoder(clip.input_ids).pooler_output


@torch.no_grad()
def xlabs_forward(ref, ip_blocks, prompt, seed, *, steps, guidance, true_gs, timestep_to_start_cfg, neg_prompt,
                  image_proj, neg_image_proj, ip_scale, neg_ip_scale, xlabs_shift=True):
    """XFluxPipeline.forward + sampling.denoise at the tiny scale, as a float image [H, W, 3] in [0, 1]."""
    c = ref.transformer.config.in_channels // 4
    lh = lw = 2 * (SIZE // (2 * ref.vae_scale_factor))
    x = torch.randn((1, c, lh, lw), generator=torch.Generator().manual_seed(seed))
    img = x.reshape(1, c, lh // 2, 2, lw // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, -1, c * 4)  # b (h w) (c ph pw)
    img_ids = torch.zeros(lh // 2, lw // 2, 3)
    img_ids[..., 1] += torch.arange(lh // 2)[:, None]
    img_ids[..., 2] += torch.arange(lw // 2)[None, :]
    img_ids = img_ids.reshape(-1, 3)
    txt, vec = xlabs_embed(ref, prompt)
    neg_txt, neg_vec = xlabs_embed(ref, neg_prompt)
    txt_ids = torch.zeros(txt.shape[1], 3)
    seq = (SIZE // 8) * (SIZE // 8) // (16 * 16) if xlabs_shift else img.shape[1]
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq - 256)
    ts = torch.linspace(1, 0, steps + 1)
    ts = (math.exp(mu) / (math.exp(mu) + (1 / ts - 1))).tolist()
    g = torch.full((1,), guidance)

    def model(t, text, pooled, proj, scale):
        ip_blocks.image_proj, ip_blocks.scale = proj, scale
        out = ref.transformer(hidden_states=img, timestep=torch.full((1,), t), guidance=g, pooled_projections=pooled,
                              encoder_hidden_states=text, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        ip_blocks.image_proj = None
        return out

    for i, (t_curr, t_prev) in enumerate(pairwise(ts)):
        pred = model(t_curr, txt, vec, image_proj, ip_scale)
        if i >= timestep_to_start_cfg:
            neg_pred = model(t_curr, neg_txt, neg_vec, neg_image_proj, neg_ip_scale)
            pred = neg_pred + true_gs * (pred - neg_pred)
        img = img + (t_prev - t_curr) * pred
    z = img.reshape(1, lh // 2, lw // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, c, lh, lw)  # unpack
    z = z / ref.vae.config.scaling_factor + ref.vae.config.shift_factor
    x = ref.vae.decode(z, return_dict=False)[0].clamp(-1, 1)
    return ((x[0] + 1) / 2).permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def reference(flux_world):
    from diffusers import FluxPipeline

    flux_dir, ipa_dir = flux_world
    ref = FluxPipeline.from_pretrained(flux_dir)
    return ref, XLabsIPBlocks(ref.transformer, ipa_dir / "ip_adapter.safetensors")


def _demo_call(released, **changes):
    """demo_flux.py's xflux_pipeline.forward arguments, from the backbone config."""
    s = released.generation.sampler
    args = dict(steps=STEPS, guidance=s.guidance_scale, true_gs=s.true_cfg_scale,
                timestep_to_start_cfg=s.true_cfg_start_step, neg_prompt="")
    return {**args, **changes}


# ---------------------------------------------------------------- tests
def test_flux_backbone_config_is_the_released_demo(released):
    s, img = released.generation.sampler, released.img
    got = (s.steps, s.guidance_scale, s.true_cfg_scale, s.true_cfg_start_step, s.shift.value)
    assert got == (30, 3.5, 3.5, 1, "xlabs")
    assert released.generation.base.negative_prompt == "" and img.negative_prompt == ""
    assert (img.ip_scale, img.negative_ip_scale, img.negative_ip_image.value) == (0.2, 0.2, "black")
    assert img.ip_adapter.weight_name == "ip_adapter.safetensors" and img.ip_adapter.model == "XLabs-AI/flux-ip-adapter"


@pytest.mark.slow
def test_flux_base_and_regeneration_match_the_xlabs_sampler(released, sampler, backend, reference, flux_world):
    from img_lightning.config.preprocess import PreprocessConfig
    from img_lightning.encoders.ip import build_ip_encoder

    ref, ip_blocks = reference
    _, ipa_dir = flux_world
    s, cfg_img = sampler, released.img
    black = xlabs_black_image_proj(ipa_dir)
    recipe = load_config(PreprocessConfig, [REPO / released.recipe], require_complete=False)
    enc = build_ip_encoder(OmegaConf.merge(recipe.encoders.ip, dict(
        image_encoder_path=str(ipa_dir / "image_encoder"), adapter_path=str(ipa_dir), dtype="float32", device="cpu")))
    assert (enc.num_tokens, enc.dim) == (4, 4096)  # ImageProjModel(4096, 768, 4)
    torch.testing.assert_close(enc.unconditional(cfg_img.negative_ip_image.value)[None], black, rtol=1e-5, atol=1e-5)

    # base image: the demo's first call (IP scale 0 on the black projection = no adapter)
    ours = backend.generate(PROMPTS, SEEDS, s, negative_prompt=released.generation.base.negative_prompt,
                            output_type="np")
    for j, (p, seed) in enumerate(zip(PROMPTS, SEEDS, strict=True)):
        want = xlabs_forward(ref, ip_blocks, p, seed, **_demo_call(released), image_proj=black, neg_image_proj=black,
                             ip_scale=0.0, neg_ip_scale=0.0)
        np.testing.assert_allclose(ours[j], want, atol=2e-4)
    base_ref = want

    # re-generation: aligned tokens at IP scale 0.2, black negative image at negative IP scale 0.2
    torch.manual_seed(0)
    aligned = torch.randn(len(PROMPTS), 4, 4096)
    backend.load_ip_adapter(cfg_img.ip_adapter)
    assert isinstance(backend.pipe.transformer.encoder_hid_proj, PassThroughIPProjection)
    assert backend.token_width() == 4096
    backend.set_ip_scale(cfg_img.ip_scale)
    ours = backend.generate(PROMPTS, SEEDS, s, negative_prompt=cfg_img.negative_prompt, ip_tokens=aligned,
                            negative_ip_tokens=enc.unconditional(cfg_img.negative_ip_image.value),
                            negative_ip_scale=cfg_img.negative_ip_scale, output_type="np")
    demo = _demo_call(released)
    for j, (p, seed) in enumerate(zip(PROMPTS, SEEDS, strict=True)):
        want = xlabs_forward(ref, ip_blocks, p, seed, **demo, image_proj=aligned[j:j + 1], neg_image_proj=black,
                             ip_scale=0.2, neg_ip_scale=0.2)
        np.testing.assert_allclose(ours[j], want, atol=2e-4)
    # each released setting changes the image far beyond that tolerance (so the match is not vacuous)
    last = dict(image_proj=aligned[-1:], neg_image_proj=black)
    for change in (dict(timestep_to_start_cfg=0), dict(true_gs=1.0), dict(xlabs_shift=False)):
        other = xlabs_forward(ref, ip_blocks, PROMPTS[-1], SEEDS[-1], **{**demo, **change}, **last, ip_scale=0.2,
                              neg_ip_scale=0.2)
        assert np.abs(other - want).max() > 10 * 2e-4, change
    for scales in ((0.2, 0.0), (0.0, 0.2)):
        other = xlabs_forward(ref, ip_blocks, PROMPTS[-1], SEEDS[-1], **demo, **last, ip_scale=scales[0],
                              neg_ip_scale=scales[1])
        assert np.abs(other - want).max() > 10 * 2e-4, scales
    assert np.abs(base_ref - want).max() > 10 * 2e-4

    # the control arm: the re-generation settings with the positive IP scale at 0
    backend.set_ip_scale(0.0)
    control = backend.generate(PROMPTS[-1:], SEEDS[-1:], s, negative_prompt=cfg_img.negative_prompt,
                               ip_tokens=enc.unconditional("black")[None],
                               negative_ip_tokens=enc.unconditional("black"),
                               negative_ip_scale=cfg_img.negative_ip_scale, output_type="np")
    want = xlabs_forward(ref, ip_blocks, PROMPTS[-1], SEEDS[-1], **demo, image_proj=black, neg_image_proj=black,
                         ip_scale=0.0, neg_ip_scale=0.2)
    np.testing.assert_allclose(control[0], want, atol=2e-4)


def test_flux_pipeline_is_the_special_case_start_0_equal_scales_diffusers_shift(backend, released, flux_world):
    """With shift=diffusers, true CFG from step 0 and one IP scale, our loop is FluxPipeline.__call__
    (same components, same schedule), which shows the plumbing; with the demo's settings it is not."""
    _, ipa_dir = flux_world
    backend.load_ip_adapter(released.img.ip_adapter)
    torch.manual_seed(1)
    tokens, neg = torch.randn(1, 4, 4096), torch.randn(1, 4, 4096)
    sampler = OmegaConf.merge(released.generation.sampler, dict(steps=4, true_cfg_start_step=0, shift="diffusers"))
    backend.set_ip_scale(0.5)
    ours = backend.generate(["a red circle"], [7], sampler, negative_prompt="", ip_tokens=tokens,
                            negative_ip_tokens=neg[0], output_type="np")
    pipe = backend.pipe
    pipe.set_ip_adapter_scale(0.5)
    want = pipe("a red circle", negative_prompt="", true_cfg_scale=3.5, guidance_scale=3.5, num_inference_steps=4,
                height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(7), output_type="np",
                ip_adapter_image_embeds=[tokens[:, None]], negative_ip_adapter_image_embeds=[neg[:, None]]).images
    np.testing.assert_allclose(ours, want, atol=1e-5)
    demo = OmegaConf.merge(released.generation.sampler, dict(steps=4))
    released_semantics = backend.generate(["a red circle"], [7], demo, negative_prompt="", ip_tokens=tokens,
                                          negative_ip_tokens=neg[0], output_type="np")
    assert np.abs(released_semantics - want).max() > 1e-2


def test_flux_with_the_adapter_loaded_an_image_without_tokens_is_the_pipelines_own(released, sampler):
    """The base image after the IP-Adapter is loaded (img-generate): both passes at IP scale 0 are
    bit for bit the pipeline without it, true CFG included."""
    fresh = DiffusionBackend.from_config(released.generation.pipeline)
    negative = released.generation.base.negative_prompt
    want = fresh.generate(PROMPTS, SEEDS, sampler, negative_prompt=negative, output_type="np")
    fresh.load_ip_adapter(released.img.ip_adapter)
    fresh.set_ip_scale(0.2)
    got = fresh.generate(PROMPTS, SEEDS, sampler, negative_prompt=negative, output_type="np")
    assert np.array_equal(got, want) and fresh.ip_scale == 0.2
    tokens = torch.randn(len(PROMPTS), 4, 4096)
    with_tokens = fresh.generate(PROMPTS, SEEDS, sampler, negative_prompt=negative, ip_tokens=tokens,
                                 negative_ip_tokens=torch.zeros(4, 4096), output_type="np")
    assert np.abs(with_tokens - want).max() > 1e-3


def test_flux_sampler_plain_settings(flux_world):
    """No true CFG: IP scale 0 reproduces the adapter-free image; the tokens reach the IP attention."""
    flux_dir, ipa_dir = flux_world
    cfg = OmegaConf.merge(OmegaConf.structured(PipelineConfig), dict(kind="flux", path=str(flux_dir), device="cpu"))
    backend = DiffusionBackend.from_config(cfg)
    sampler = OmegaConf.merge(OmegaConf.structured(SamplerConfig),
                              dict(steps=2, guidance_scale=3.5, height=SIZE, width=SIZE))
    base = backend.generate(["a red circle"], [3], sampler)
    assert base[0].size == (SIZE, SIZE)
    assert np.array_equal(np.asarray(base[0]), np.asarray(backend.generate(["a red circle"], [3], sampler)[0]))
    ipa = OmegaConf.merge(OmegaConf.structured(IPAdapterConfig),
                          dict(path=str(ipa_dir), subfolder="", weight_name="ip_adapter.safetensors"))
    backend.load_ip_adapter(ipa)
    tokens = torch.randn(1, 4, 4096)
    backend.set_ip_scale(0.0)
    control = backend.generate(["a red circle"], [3], sampler, ip_tokens=tokens)
    backend.set_ip_scale(1.0)
    img = backend.generate(["a red circle"], [3], sampler, ip_tokens=tokens)
    c, i, b = (np.asarray(x[0], dtype=int) for x in (control, img, base))
    assert np.abs(c - b).max() <= 1  # IP scale 0 = the base image
    assert np.abs(i - c).max() > 0  # the tokens reach the transformer's IP attention
    with pytest.raises(ValueError, match="multiples of 4"):
        backend.generate(["x"], [1], OmegaConf.merge(sampler, dict(height=30)), ip_tokens=tokens)


def test_tiny_flux_adapter_has_the_v1_layout(flux_world):
    from img_lightning.tiny.flux import INNER_DIM, NUM_DOUBLE_BLOCKS

    _, ipa_dir = flux_world
    sd = load_file(str(ipa_dir / "ip_adapter.safetensors"))
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    want = {"ip_adapter_proj_model.proj.weight": (16384, 768), "ip_adapter_proj_model.proj.bias": (16384,),
            "ip_adapter_proj_model.norm.weight": (4096,), "ip_adapter_proj_model.norm.bias": (4096,)}
    for i in range(NUM_DOUBLE_BLOCKS):
        for kv in "kv":
            p = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj"
            want.update({f"{p}.weight": (INNER_DIM, 4096), f"{p}.bias": (INNER_DIM,)})
    assert shapes == want
    # XLabs' own tokens of a picture equal our IP encoder's (the features the FLUX aligner reads)
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from img_lightning.encoders.ip import build_ip_encoder

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    tower = CLIPVisionModelWithProjection.from_pretrained(ipa_dir / "image_encoder").eval()
    with torch.no_grad():
        emb = tower(CLIPImageProcessor.from_pretrained(ipa_dir / "image_encoder")(
            images=picture, return_tensors="pt").pixel_values).image_embeds
    enc = build_ip_encoder(OmegaConf.structured(IPEncoderConfig(
        kind="flux_xlabs", image_encoder_path=str(ipa_dir / "image_encoder"), adapter_path=str(ipa_dir),
        adapter_subfolder="", adapter_weight_name="ip_adapter.safetensors", dtype="float32", device="cpu")))
    torch.testing.assert_close(enc.encode([picture]), xlabs_image_proj(ipa_dir / "ip_adapter.safetensors", emb),
                               rtol=1e-5, atol=1e-5)


def test_flux_decodes_in_float32_as_xlabs(flux_world, monkeypatch):
    """With the backbone's bf16 pipeline the decode is XLabs' ``ae.decode(unpack(x.float(), h, w))``:
    the bf16 latents upcast, un-scaled and decoded by the stored VAE weights in float32."""
    from diffusers import AutoencoderKL

    import img_lightning.generation.pipeline as pipeline_module
    from img_lightning.generation.flux_sampler import decode_float32

    flux_dir, _ = flux_world
    # on CPU the configured dtype is replaced by float32; force the GPU behaviour (bf16 everywhere but the VAE)
    monkeypatch.setattr(pipeline_module, "compute_dtype", lambda name, device: torch.bfloat16)
    cfg = OmegaConf.merge(OmegaConf.structured(PipelineConfig),
                          dict(kind="flux", path=str(flux_dir), device="cpu", dtype="bfloat16"))
    pipe = DiffusionBackend.from_config(cfg).pipe
    assert pipe.transformer.dtype == pipe.text_encoder_2.dtype == pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float32
    decoder_inputs, last_step = [], []
    pipe.vae.decoder.register_forward_pre_hook(lambda module, args: decoder_inputs.append(args[0].dtype))
    step = pipe.scheduler.step

    def keep_last(*args, **kwargs):
        out = step(*args, **kwargs)
        last_step[:] = [out[0]]
        return out

    monkeypatch.setattr(pipe.scheduler, "step", keep_last)
    sampler = OmegaConf.merge(OmegaConf.structured(SamplerConfig),
                              dict(steps=2, guidance_scale=3.5, height=SIZE, width=SIZE))
    backend = DiffusionBackend(pipe, "flux", torch.device("cpu"), torch.bfloat16)
    ours = backend.generate(PROMPTS, SEEDS, sampler, output_type="np")
    packed = last_step[0]
    assert packed.dtype == torch.bfloat16  # the sampler's own latents stay in the pipeline's dtype
    assert decoder_inputs == [torch.float32] * len(PROMPTS)  # one image at a time, in float32

    # independent: XLabs' unpack of x.float() and BFL's un-scaling, the stored VAE weights in float32
    vae = AutoencoderKL.from_pretrained(flux_dir / "vae").eval()
    assert vae.dtype == torch.float32
    c, lh = packed.shape[-1] // 4, SIZE // pipe.vae_scale_factor
    z = packed.float().reshape(len(PROMPTS), lh // 2, lh // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(-1, c, lh, lh)
    with torch.no_grad():
        want = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample
        latents = (z / vae.config.scaling_factor + vae.config.shift_factor).bfloat16()
        bf16 = vae.to(torch.bfloat16).decode(latents).sample
    as_np = lambda x: ((x.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()  # noqa: E731
    np.testing.assert_allclose(ours, as_np(want), atol=1e-6)
    gap = np.abs(as_np(bf16) - as_np(want)).max()
    assert gap > 1e-3, gap  # a bf16 decode would not pass the check above

    pipe.vae.to(torch.bfloat16)
    with pytest.raises(ValueError, match="decodes in float32"):
        decode_float32(pipe, packed, SIZE, SIZE)
