"""Diffusers pipelines for evaluation: SDXL (optionally with another UNet, e.g. SDXL-DPO) and FLUX.

One object, :class:`DiffusionBackend`, generates a batch of prompts with one seed per prompt
(a CPU ``torch.Generator`` each, as the demos' ``torch.Generator().manual_seed(seed)``, so an image
does not depend on its batch neighbours' seeds, the device, or the batch size) and, once
:meth:`load_ip_adapter` has run, conditions on given IP tokens through the pass-through projection
(see ``ip_inject.py``). SDXL runs ``StableDiffusionXLPipeline`` itself; FLUX runs XLabs' sampler
semantics on the FluxPipeline's components (``flux_sampler.py``), as the released FLUX demo does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from ..config.eval import IPAdapterConfig, PipelineConfig, SamplerConfig
from ..hf_quiet import diffusers_errors_only, quiet_hf_progress
from ..models import ModelNotFoundError, compute_dtype, from_pretrained, missing_model_message, resolve_device
from .flux_sampler import FluxIP, sample_flux
from .ip_inject import cfg_pair, install_passthrough, ip_token_width


class DiffusionBackend:
    def __init__(self, pipe: Any, kind: str, device: torch.device, dtype: torch.dtype) -> None:
        self.pipe = pipe
        self.kind = kind
        self.device = device
        self.dtype = dtype
        self.ip_loaded = False
        self.ip_scale = 1.0
        pipe.set_progress_bar_config(disable=True)

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> DiffusionBackend:
        import diffusers  # noqa: F401 - imported before loading, so its loading bars can be hidden

        quiet_hf_progress()
        device = resolve_device(cfg.device)
        dtype = compute_dtype(cfg.dtype, device)
        common: dict[str, Any] = dict(dtype=dtype, revision=cfg.revision)
        if cfg.variant:
            common["variant"] = cfg.variant
        if cfg.kind == "sdxl":
            from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

            extra = {}
            if cfg.unet or cfg.unet_path:
                unet_kwargs: dict[str, Any] = dict(dtype=dtype)
                if cfg.unet_subfolder:
                    unet_kwargs["subfolder"] = cfg.unet_subfolder
                extra["unet"] = from_pretrained(UNet2DConditionModel.from_pretrained, "UNet", cfg.unet or "",
                                                cfg.unet_path, "generation.pipeline.unet_path", **unet_kwargs)
            # No invisible watermark: the released demos' environment has no invisible-watermark
            # package (so diffusers adds none to the base image) and the IP pipeline sets it off.
            pipe = from_pretrained(StableDiffusionXLPipeline.from_pretrained, "SDXL pipeline", cfg.model, cfg.path,
                         "generation.pipeline.path", add_watermarker=False, **common, **extra)
        elif cfg.kind == "flux":
            from diffusers import FluxPipeline

            # XLabs decodes in float32 with the autoencoder as stored (BFL's ae.safetensors is float32):
            # the VAE is loaded in float32, everything else in the configured dtype.
            common["dtype"] = {"default": dtype, "vae": torch.float32}
            pipe = from_pretrained(FluxPipeline.from_pretrained, "FLUX pipeline", cfg.model, cfg.path,
                         "generation.pipeline.path", **common)
            pipe.vae.enable_slicing()  # one image at a time (as XLabs): a float32 decode at 1024² is large
        else:
            raise ValueError(f"generation.pipeline.kind must be 'sdxl' or 'flux', got '{cfg.kind}'")
        quiet_hf_progress()
        if cfg.cpu_offload and device.type == "cuda":
            pipe.enable_model_cpu_offload()
        else:
            with diffusers_errors_only():  # a dtype-cast advisory that does not apply to whole pipelines
                pipe.to(device)
        return cls(pipe, cfg.kind, device, dtype)

    # ------------------------------------------------------------------ IP-Adapter
    def load_ip_adapter(self, cfg: IPAdapterConfig) -> None:
        """Load the adapter's attention layers (no image encoder: we pass tokens), then make the
        model take our tokens as they are."""
        if self.ip_loaded:
            return
        src = cfg.path or cfg.model
        try:
            # diffusers warns that no image encoder is loaded: by design, we pass projected tokens.
            with diffusers_errors_only():
                if self.kind == "sdxl":
                    self.pipe.load_ip_adapter(src, subfolder=cfg.subfolder, weight_name=cfg.weight_name,
                                              image_encoder_folder=None, local_files_only=True)
                else:
                    self.pipe.load_ip_adapter(src, weight_name=cfg.weight_name, subfolder=cfg.subfolder or "",
                                              image_encoder_pretrained_model_name_or_path=None,
                                              local_files_only=True)
        except OSError as err:
            if cfg.path:
                raise ModelNotFoundError(f"IP-Adapter: cannot load {cfg.path} "
                                         f"({cfg.subfolder}/{cfg.weight_name}): {err}") from None
            wanted = f"{cfg.subfolder}/{cfg.weight_name}" if cfg.subfolder else cfg.weight_name
            raise ModelNotFoundError(missing_model_message("IP-Adapter", cfg.model, "img.ip_adapter.path",
                                                           files=[wanted])) from None
        install_passthrough(self.pipe)
        self.ip_loaded = True

    def set_ip_scale(self, scale: float) -> None:
        """IP scale of the next batches (FLUX: of the positive pass; see ``negative_ip_scale``)."""
        self.ip_scale = float(scale)
        if self.kind == "sdxl":
            self.pipe.set_ip_adapter_scale(self.ip_scale)

    def token_width(self) -> int:
        return ip_token_width(self.pipe)

    def _size(self, sampler: SamplerConfig) -> tuple[int, int]:
        default = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return int(sampler.height or default), int(sampler.width or default)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        sampler: SamplerConfig,
        negative_prompt: Optional[str] = None,
        ip_tokens: Optional[Tensor] = None,
        negative_ip_tokens: Optional[Tensor] = None,
        negative_ip_scale: Optional[float] = None,
        output_type: str = "pil",
    ) -> Any:
        """One batch. ``ip_tokens`` ``[B, N, D]`` (already projected) need :meth:`load_ip_adapter`;
        without them the image is the pipeline's own, whether the adapter is loaded or not.

        ``negative_prompt``: None = the pipeline's default (SDXL: zero embeddings, as the demos' calls
        without one; FLUX true CFG: the encoded empty prompt, XLabs' default); a string is encoded.
        ``negative_ip_tokens`` ``[N, D]`` or ``[B, N, D]``: the unconditional IP input (SDXL: the
        negative CFG half; FLUX: the true-CFG pass, at ``negative_ip_scale``, default the IP scale).
        """
        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt")
        if self.ip_loaded and ip_tokens is None:
            return self._without_adapter(prompts, seeds, sampler, negative_prompt, output_type)
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        height, width = self._size(sampler)
        b = len(prompts)
        pos: Optional[Tensor] = None
        negt: Optional[Tensor] = None  # set with pos
        if ip_tokens is not None:
            pos = ip_tokens.to(self.device, self.dtype)[:, None]
            negt = negative_ip_tokens if negative_ip_tokens is not None else torch.zeros_like(ip_tokens)
            negt = negt.to(self.device, self.dtype)
            negt = (negt[None] if negt.ndim == 2 else negt)[:, None].expand_as(pos).contiguous()
        if self.kind == "sdxl":
            if negative_ip_scale is not None and negative_ip_scale != self.ip_scale:
                raise ValueError("SDXL applies one IP scale to both CFG halves; leave negative_ip_scale unset")
            kwargs: dict[str, Any] = dict(
                prompt=list(prompts), num_inference_steps=sampler.steps, guidance_scale=sampler.guidance_scale,
                generator=gens, output_type=output_type, height=height, width=width,
            )
            if negative_prompt is not None:
                kwargs["negative_prompt"] = [negative_prompt] * b
            if pos is not None and negt is not None:
                kwargs["ip_adapter_image_embeds"] = [cfg_pair(negt, pos) if sampler.guidance_scale > 1 else pos]
            return self.pipe(**kwargs).images
        ip = None
        if pos is not None and negt is not None:
            neg_scale = self.ip_scale if negative_ip_scale is None else float(negative_ip_scale)
            ip = FluxIP(tokens=pos, scale=self.ip_scale, negative_tokens=negt, negative_scale=neg_scale)
        shift = sampler.shift.value if hasattr(sampler.shift, "value") else str(sampler.shift)
        return sample_flux(
            self.pipe, prompts, gens, steps=sampler.steps, guidance_scale=sampler.guidance_scale, height=height,
            width=width, true_cfg_scale=sampler.true_cfg_scale, true_cfg_start_step=sampler.true_cfg_start_step,
            negative_prompt="" if negative_prompt is None else negative_prompt, shift=shift, ip=ip,
            output_type=output_type,
        )

    def _without_adapter(self, prompts: Sequence[str], seeds: Sequence[int], sampler: SamplerConfig,
                         negative_prompt: Optional[str], output_type: str) -> Any:
        """The pipeline's own image with the IP-Adapter loaded: IP scale 0 in every pass. Its layers
        then add exactly nothing (diffusers skips an SDXL IP layer at scale 0; FLUX adds 0 x its
        output), so this is bit for bit the image of the pipeline without the adapter (tested); the
        tokens are placeholders."""
        scale = self.ip_scale
        tokens = torch.zeros(len(prompts), 1, self.token_width())
        self.set_ip_scale(0.0)
        try:
            return self.generate(prompts, seeds, sampler, negative_prompt=negative_prompt, ip_tokens=tokens,
                                 negative_ip_tokens=tokens, negative_ip_scale=None if self.kind == "sdxl" else 0.0,
                                 output_type=output_type)
        finally:
            self.set_ip_scale(scale)

    def close(self) -> None:
        self.pipe = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
