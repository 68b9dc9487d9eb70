"""FLUX sampling with the semantics of XLabs' x-flux sampler, on diffusers' FluxPipeline components.

The released IMG FLUX demo samples with XLabs' ``XFluxPipeline`` (``denoise`` in x-flux's
``sampling.py``). diffusers' ``FluxPipeline.__call__`` differs from it in three ways, each of which
changes every image of the demo's setting:

1. the timestep shift: XLabs computes ``mu`` from ``(W // 8) * (H // 8) // 256`` (64 tokens at
   1024x1024, ``mu`` ~ 0.47), FluxPipeline from the packed latent length (4096, ``mu`` = 1.15);
2. true CFG starts at step ``timestep_to_start_cfg`` (0-based; the demo passes 1, so its first step
   runs the positive pass alone), FluxPipeline's from step 0;
3. the negative pass has its own IP scale (``neg_ip_scale``); FluxPipeline uses one scale for both.

So this module runs XLabs' loop - per step ``pred = model(pos)``; from the start step on
``pred = neg + true_gs * (pred - neg)`` with the negative prompt and negative IP tokens; Euler step
``x += (t_next - t) * pred`` - while everything else is diffusers' own: the text encoders
(``encode_prompt``: T5 padded to 512 tokens, CLIP pooled, as XLabs' ``HFEmbedder``), noise and
packing (``prepare_latents``), the schedule (the scheduler's ``set_timesteps(sigmas, mu)``, which is
XLabs' ``time_shift`` of ``linspace(1, 0, steps + 1)``), the transformer with the adapter's IP
attention (``FluxIPAdapterAttnProcessor``: ``img += scale * attn(q_img, k_ip, v_ip)`` after the
double-stream block, XLabs' ``IPDoubleStreamBlockProcessor``), the Euler update (``scheduler.step``)
and the VAE decode, which runs in float32 as XLabs' ``ae.decode(unpack(x.float(), h, w))`` does (the
VAE is loaded in float32; the rest of the pipeline in the configured dtype). With
``shift=diffusers``, start step 0 and equal IP scales it is FluxPipeline's own sampling (a test
checks both against independent re-implementations).

Numerics that differ from the demo and cannot change a conclusion: the noise comes from a CPU
generator per prompt (the demo draws it on the GPU), the Euler update accumulates in float32
(diffusers' scheduler; XLabs adds in bf16), images are rounded to 8 bit (XLabs truncates).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

T5_MAX_LENGTH = 512  # XLabs' load_t5(max_length=512); FluxPipeline's default too


@dataclass
class FluxIP:
    """IP-Adapter inputs of one batch: projected tokens ``[B, 1, N, D]`` for both passes and their scales."""

    tokens: Tensor
    scale: float
    negative_tokens: Tensor
    negative_scale: float


def xlabs_mu(height: int, width: int) -> float:
    """XLabs' ``get_schedule(steps, (W // 8) * (H // 8) // (16 * 16))`` shift: a line through
    (256, 0.5) and (4096, 1.15), evaluated at that (deliberately reproduced) length."""
    seq = (width // 8) * (height // 8) // (16 * 16)
    return 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq - 256)


def diffusers_mu(scheduler: Any, packed_len: int) -> float:
    """FluxPipeline's ``calculate_shift`` of the packed latent length, from the scheduler's config."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = scheduler.config
    return calculate_shift(packed_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                           c.get("base_shift", 0.5), c.get("max_shift", 1.15))


def _predict(pipe: Any, latents: Tensor, sigma: Tensor, guidance: Optional[Tensor], pooled: Tensor, text: Tensor,
             text_ids: Tensor, image_ids: Tensor, ip_tokens: Optional[Tensor], ip_scale: float) -> Tensor:
    kwargs = None
    if ip_tokens is not None:
        pipe.set_ip_adapter_scale(ip_scale)  # a per-pass attribute on each IP processor: cheap
        kwargs = {"ip_adapter_image_embeds": [ip_tokens]}
    return pipe.transformer(hidden_states=latents, timestep=sigma, guidance=guidance, pooled_projections=pooled,
                            encoder_hidden_states=text, txt_ids=text_ids, img_ids=image_ids,
                            joint_attention_kwargs=kwargs, return_dict=False)[0]


def decode_float32(pipe: Any, packed: Tensor, height: int, width: int) -> Tensor:
    """XLabs' ``ae.decode(unpack(x.float(), h, w))``: un-scale, shift and decode in float32, with a
    float32 VAE and no autocast (the latents of the bf16 sampler are upcast first, not the image after)."""
    if pipe.vae.dtype != torch.float32:
        raise ValueError(f"the FLUX VAE is in {pipe.vae.dtype}; XLabs decodes in float32: load the pipeline with "
                         "dtype={'default': ..., 'vae': torch.float32} (DiffusionBackend does)")
    latents = pipe._unpack_latents(packed.float(), height, width, pipe.vae_scale_factor)
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    with torch.autocast(latents.device.type, enabled=False):
        return pipe.vae.decode(latents, return_dict=False)[0]


@torch.no_grad()
def sample_flux(
    pipe: Any,
    prompts: Sequence[str],
    generators: Sequence[torch.Generator],
    *,
    steps: int,
    guidance_scale: float,
    height: int,
    width: int,
    true_cfg_scale: float = 1.0,
    true_cfg_start_step: int = 0,
    negative_prompt: str = "",
    shift: str = "xlabs",
    ip: Optional[FluxIP] = None,
    output_type: str = "pil",
) -> Any:
    """One batch of images (``output_type`` ``pil``: a list; ``np``: float ``[B, H, W, 3]`` in [0, 1])."""
    step_px = pipe.vae_scale_factor * 2
    if height % step_px or width % step_px:
        raise ValueError(f"FLUX height/width must be multiples of {step_px}, got {height}x{width}")
    if shift not in ("xlabs", "diffusers"):
        raise ValueError(f"unknown FLUX shift {shift!r}; use xlabs or diffusers")
    device = pipe._execution_device
    b = len(prompts)
    text, pooled, text_ids = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=device,
                                                max_sequence_length=T5_MAX_LENGTH)
    # XLabs runs the negative pass from the start step whatever true_gs is; at 1 it returns the
    # positive prediction, so it is skipped.
    cfg = true_cfg_scale != 1.0
    if cfg:
        neg_text, neg_pooled, neg_ids = pipe.encode_prompt(prompt=[negative_prompt] * b, prompt_2=None, device=device,
                                                           max_sequence_length=T5_MAX_LENGTH)
    latents, image_ids = pipe.prepare_latents(b, pipe.transformer.config.in_channels // 4, height, width, text.dtype,
                                              device, list(generators))
    mu = xlabs_mu(height, width) if shift == "xlabs" else diffusers_mu(pipe.scheduler, latents.shape[1])
    from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

    timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, device, sigmas=np.linspace(1.0, 1 / steps, steps).tolist(),
                                      mu=mu)
    pipe.scheduler.set_begin_index(0)
    guidance = None
    if pipe.transformer.config.guidance_embeds:
        guidance = torch.full([b], guidance_scale, device=device, dtype=torch.float32)
    pos_ip = neg_ip = None
    if ip is not None:
        pos_ip, neg_ip = ip.tokens.to(device, text.dtype), ip.negative_tokens.to(device, text.dtype)
    for i, t in enumerate(timesteps):
        # XLabs' model input: t itself (not t * 1000) in the latents' dtype; the model scales it.
        sigma = (t / pipe.scheduler.config.num_train_timesteps).expand(b).to(latents.dtype)
        pred = _predict(pipe, latents, sigma, guidance, pooled, text, text_ids, image_ids, pos_ip,
                        ip.scale if ip else 0.0)
        if cfg and i >= true_cfg_start_step:
            neg = _predict(pipe, latents, sigma, guidance, neg_pooled, neg_text, neg_ids, image_ids, neg_ip,
                           ip.negative_scale if ip else 0.0)
            pred = neg + true_cfg_scale * (pred - neg)
        latents = pipe.scheduler.step(pred, t, latents, return_dict=False)[0]
    image = decode_float32(pipe, latents, height, width)
    out = pipe.image_processor.postprocess(image, output_type=output_type)
    pipe.maybe_free_model_hooks()
    return out
