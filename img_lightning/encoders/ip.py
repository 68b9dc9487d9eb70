"""IP-Adapter image features ``c_I``: the tokens the IMG aligner reads and writes.

Shared by preprocessing (training targets) and evaluation (inference inputs), so both compute the
same numbers. Two adapters, one interface (:class:`IPEncoder`):

* ``sdxl_plus`` - IP-Adapter-Plus for SDXL (``ip-adapter-plus_sdxl_vit-h``): CLIP ViT-H/14
  penultimate hidden states ``[257, 1280]`` -> the adapter's Perceiver resampler -> ``[16, 2048]``.
* ``flux_xlabs`` - XLabs' FLUX IP-Adapter v1 (``XLabs-AI/flux-ip-adapter``, ``ip_adapter.safetensors``):
  CLIP ViT-L/14 projected ``image_embeds`` ``[768]`` -> ``ImageProjModel(4096, 768, 4)`` (linear to
  4 x 4096, LayerNorm) -> ``[4, 4096]``. These are exactly the tensors XLabs'
  ``IPDoubleStreamBlockProcessor`` (and diffusers' ``FluxIPAdapterAttnProcessor``) feed to their
  key/value projections, i.e. the FLUX counterpart of the SDXL resampler output, hence the FLUX
  aligner's 4096-wide tokens (diffusers' converter reads 4 tokens from this file; 16 only for a
  65536-row projection, which the v1 file is not).

The projection is built from the ORIGINAL checkpoint by diffusers' own converters (the methods
``load_ip_adapter`` calls), so the weights are interpreted exactly as in a pipeline; a test checks
our tokens against ``pipe.load_ip_adapter`` + ``unet.encoder_hid_proj``. Images are preprocessed as
the pipelines do: ``CLIPImageProcessor(size=S, crop_size=S)`` with ``S`` the tower's resolution
(resize shortest side, centre crop, CLIP mean/std).

Precision: both halves run in ``dtype``; with ``autocast`` (the SDXL recipes) under
``torch.autocast`` in that dtype, as the released SDXL ``get_ip_feat`` runs its fp16 CLIP and
resampler inside ``torch.cuda.amp.autocast()`` (on CUDA LayerNorm and softmax then run in float32,
and the residual stream stays float32). The unconditional tokens are computed without it, as the
demo's IP-Adapter class computes them.

Unconditional tokens (the negative IP condition at inference) follow the released demos, per kind
(``unconditional("auto")``): SDXL encodes an all-zero ``pixel_values`` tensor (IP-Adapter's
``generate_from_feat``, diffusers' SDXL ``encode_image``); FLUX encodes an all-black image through
the processor (the IMG FLUX demo's ``np.zeros((1024, 1024, 3), uint8)``, also ``FluxPipeline``'s).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from PIL import Image
from torch import Tensor

from ..config.encoders import IPEncoderConfig
from ..models import ModelNotFoundError, find_in, model_dir, resolve_device, resolve_dtype, resolve_model_root

KINDS = ("sdxl_plus", "flux_xlabs")


class _ConverterHost:
    """Stand-in ``self`` for diffusers' converters (they only read ``device``/``dtype``)."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype


def load_adapter_state_dict(path: str | Path) -> dict[str, dict[str, Tensor]]:
    """Read an original IP-Adapter file into ``{"image_proj": {...}, "ip_adapter": {...}}``.

    ``.safetensors``: keys prefixed ``image_proj.``/``ip_adapter.`` (h94) or
    ``ip_adapter_proj_model.``/``double_blocks.`` (XLabs), split as diffusers' loaders split them.
    ``.bin``/``.pt``: the nested dict, read with ``weights_only=True`` (no arbitrary unpickling).
    """
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        sd: dict[str, dict[str, Tensor]] = {"image_proj": {}, "ip_adapter": {}}
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                head, _, rest = key.partition(".")
                if head in ("image_proj", "ip_adapter_proj_model"):
                    sd["image_proj"][rest] = f.get_tensor(key)
                elif head in ("ip_adapter", "double_blocks"):
                    sd["ip_adapter"][rest] = f.get_tensor(key)
        return sd
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or "image_proj" not in sd:
        raise ValueError(f"{path}: not an IP-Adapter checkpoint (expected an 'image_proj' entry)")
    return sd


def build_image_projection(kind: str, image_proj: dict[str, Tensor]) -> torch.nn.Module:
    """The diffusers projection module for an original ``image_proj`` state dict."""
    host = _ConverterHost(torch.device("cpu"), torch.float32)
    mixin: Any  # the diffusers loader whose converter builds this kind's projection (run on a stand-in host)
    if kind == "sdxl_plus":
        from diffusers.loaders.unet import UNet2DConditionLoadersMixin

        mixin = UNet2DConditionLoadersMixin
    elif kind == "flux_xlabs":
        from diffusers.loaders.transformer_flux import FluxTransformer2DLoadersMixin

        mixin = FluxTransformer2DLoadersMixin
    else:
        raise ValueError(f"unknown IP encoder kind {kind!r}; use one of {KINDS}")
    if not image_proj:
        raise ValueError("the adapter checkpoint has no image projection weights")
    return mixin._convert_ip_adapter_image_proj_to_diffusers(host, image_proj, low_cpu_mem_usage=False)


class IPEncoder:
    """Images -> IP tokens ``[B, N, D]`` (float32, CPU)."""

    def __init__(self, kind: str, image_encoder: torch.nn.Module, projection: torch.nn.Module, image_size: int,
                 device: torch.device, dtype: torch.dtype, batch_size: int = 16, autocast: bool = False) -> None:
        """``autocast``: run both halves under ``torch.autocast`` in ``dtype`` (the released SDXL
        ``get_ip_feat``); nothing to do, so off, in float32."""
        from transformers import CLIPImageProcessor

        if kind not in KINDS:
            raise ValueError(f"unknown IP encoder kind {kind!r}; use one of {KINDS}")
        self.kind = kind
        self.device = device
        self.dtype = dtype
        self.batch_size = max(1, int(batch_size))
        self.autocast = bool(autocast) and dtype in (torch.float16, torch.bfloat16)
        self.image_encoder = image_encoder.to(device=device, dtype=dtype).eval()
        self.projection = projection.to(device=device, dtype=dtype).eval()
        self.image_size = int(image_size)
        # Exactly what diffusers' load_ip_adapter registers as the pipeline's feature_extractor.
        self.processor = CLIPImageProcessor(size=self.image_size, crop_size=self.image_size)
        with torch.inference_mode():
            probe = self.forward(torch.zeros(1, 3, self.image_size, self.image_size))
        self.num_tokens, self.dim = int(probe.shape[1]), int(probe.shape[2])

    @classmethod
    def from_config(cls, cfg: IPEncoderConfig) -> IPEncoder:
        from transformers import CLIPVisionModelWithProjection

        enc_root = resolve_model_root(cfg.image_encoder, cfg.image_encoder_path, cfg.revision,
                                      "encoders.ip.image_encoder_path")
        enc_dir = model_dir(enc_root, cfg.image_encoder_subfolder, cfg.image_encoder,
                            "encoders.ip.image_encoder_path")
        ada_root = resolve_model_root(cfg.adapter, cfg.adapter_path, cfg.revision, "encoders.ip.adapter_path")
        ada_file = ada_root if ada_root.is_file() else find_in(
            ada_root, cfg.adapter_subfolder, cfg.adapter_weight_name, cfg.adapter, "encoders.ip.adapter_path"
        )
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype)
        try:
            image_encoder = CLIPVisionModelWithProjection.from_pretrained(enc_dir, dtype=dtype)
        except OSError as err:
            raise ModelNotFoundError(f"cannot load the CLIP image encoder from {enc_dir}: {err}") from None
        projection = build_image_projection(cfg.kind, load_adapter_state_dict(ada_file)["image_proj"])
        image_size = cast(int, image_encoder.config.image_size)  # CLIP vision configs hold one side length
        return cls(cfg.kind, image_encoder, projection, image_size, device, dtype,
                   cfg.batch_size, autocast=cfg.autocast)

    # -- the two halves, separable so a pipeline can prepare batch i+1 while batch i runs ------
    def prepare(self, images: Sequence[Image.Image]) -> Tensor:
        """PIL images -> ``pixel_values`` ``[B, 3, S, S]`` float32 (CPU work only)."""
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        return self.processor(images=rgb, return_tensors="pt").pixel_values

    @torch.inference_mode()
    def forward(self, pixel_values: Tensor, autocast: bool = True) -> Tensor:
        """``pixel_values`` -> tokens ``[B, N, D]`` float32 on CPU (``autocast=False``: never under autocast)."""
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast and autocast):
            if self.kind == "sdxl_plus":
                feats = self.image_encoder(pixel_values, output_hidden_states=True).hidden_states[-2]
            else:
                feats = self.image_encoder(pixel_values).image_embeds
            return self.projection(feats).float().cpu()

    def encode(self, images: Sequence[Image.Image]) -> Tensor:
        if len(images) == 0:
            return torch.empty(0, self.num_tokens, self.dim)
        out = [self.forward(self.prepare(images[i : i + self.batch_size]))
               for i in range(0, len(images), self.batch_size)]
        return torch.cat(out)

    def unconditional(self, mode: str = "auto") -> Tensor:
        """Tokens of the negative IP input ``[N, D]``: ``zero_pixels`` (an all-zero ``pixel_values``
        tensor, i.e. mean-grey after CLIP normalisation), ``black`` (a black image through the
        processor) or ``auto`` (the released demo's choice for this kind; see the module docstring)."""
        if mode == "auto":
            mode = "zero_pixels" if self.kind == "sdxl_plus" else "black"
        if mode == "zero_pixels":
            pixels = torch.zeros(1, 3, self.image_size, self.image_size)
        elif mode == "black":
            pixels = self.prepare([Image.new("RGB", (self.image_size, self.image_size), (0, 0, 0))])
        else:
            raise ValueError(f"unknown negative IP image {mode!r}; use auto, zero_pixels or black")
        # without autocast: the SDXL demo computes these in its IP-Adapter class (get_image_embeds_feat),
        # not in get_ip_feat
        return self.forward(pixels, autocast=False)[0]


def build_ip_encoder(cfg: IPEncoderConfig) -> IPEncoder:
    """Factory used by preprocessing and evaluation (``cfg.kind`` is an ``IPKind``: checked at load)."""
    return IPEncoder.from_config(cfg)
