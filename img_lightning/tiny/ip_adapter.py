"""Tiny IP-Adapter checkpoints in the ORIGINAL released layouts.

* SDXL "plus" (``h94/IP-Adapter``, ``sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors``): tensors
  ``image_proj.*`` (the Perceiver resampler, parameter names of the original ``Resampler`` module)
  and ``ip_adapter.{i}.to_k_ip.weight`` / ``to_v_ip.weight`` where ``i`` indexes the UNet's
  attention processors (cross-attention ones are the odd indices). Real: dim 1280, 20 heads of 64,
  depth 4, 16 queries, ViT-H width 1280 in, 2048 out. Tiny: dim 64 (1 head of 64: diffusers infers
  ``heads = to_q rows // 64``), depth 4 (diffusers' converter assumes it), 16 queries, 32 in
  (tiny CLIP width), 64 out (tiny SDXL ``cross_attention_dim``).
* FLUX XLabs IP-Adapter v1 (``XLabs-AI/flux-ip-adapter``, ``ip_adapter.safetensors``): the real keys
  and shapes of XLabs' ``ImageProjModel(4096, 768, 4)`` - ``ip_adapter_proj_model.proj`` ``[4 * 4096,
  768]`` (+ bias), ``ip_adapter_proj_model.norm`` ``[4096]`` - and, per double-stream block ``i``,
  ``double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj`` ``[inner, 4096]`` (+ bias).
  Only the FLUX transformer is scaled down: its width ``inner`` (3072 real) and block count (19
  real); the CLIP tower's projection is 768 wide as in ``openai/clip-vit-large-patch14``.

Both are laid out in folders mirroring the hub repositories, so configs only swap the root path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .sizes import TINY_RESAMPLER, TINY_VISION, ClipVisionSize, ResamplerSize, default_dtype
from .vision import build_tiny_clip_vision

SDXL_PLUS_SUBFOLDER = "sdxl_models"
SDXL_PLUS_WEIGHT = "ip-adapter-plus_sdxl_vit-h.safetensors"
SDXL_IMAGE_ENCODER_SUBFOLDER = "models/image_encoder"
FLUX_WEIGHT = "ip_adapter.safetensors"
FLUX_IMAGE_ENCODER_SUBFOLDER = "image_encoder"
NUM_TOKENS = 16  # SDXL Plus resampler queries
FLUX_NUM_TOKENS = 4  # XLabs v1: ImageProjModel(4096, 768, 4)
FLUX_TOKEN_DIM = 4096  # FLUX's joint attention (T5) width, the adapter's context dim
FLUX_CLIP_EMBED_DIM = 768  # CLIP ViT-L/14 image_embeds


class _PerceiverAttention(nn.Module):
    """Parameter layout of the original resampler's attention block (names matter, not forward)."""

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
    )


class _Resampler(nn.Module):
    """Parameter layout of the original IP-Adapter-Plus ``Resampler``."""

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, num_queries: int, embedding_dim: int,
                 output_dim: int, ff_mult: int = 4) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            [nn.ModuleList([_PerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)])
             for _ in range(depth)]
        )


def _save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in sorted(tensors.items())}, str(path))
    return path


def build_tiny_ip_adapter_plus_sdxl(out_dir: str | Path, sdxl_dir: str | Path, seed: int = 0,
                                    vision: ClipVisionSize = TINY_VISION, resampler: ResamplerSize = TINY_RESAMPLER,
                                    dtype: torch.dtype = torch.float32) -> Path:
    """Write ``{out_dir}/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors`` and the tiny CLIP
    tower under ``{out_dir}/models/image_encoder`` (the ``h94/IP-Adapter`` layout).

    ``sdxl_dir``: the SDXL pipeline whose UNet the adapter must fit (see ``build_tiny_sdxl``).
    Like the original training recipe, each ``to_k_ip``/``to_v_ip`` starts as a copy of the UNet's
    own cross-attention ``to_k``/``to_v``, so IP tokens steer the tiny UNet as text tokens do.
    ``vision``/``resampler``: the tiny ones, or the real ViT-H/14 width and resampler (:mod:`.sizes`).
    """
    from diffusers import UNet2DConditionModel

    out_dir = Path(out_dir)
    build_tiny_clip_vision(out_dir / SDXL_IMAGE_ENCODER_SUBFOLDER, seed=seed, size=vision, dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(Path(sdxl_dir) / "unet")
    cross_dim = int(unet.config.cross_attention_dim)
    torch.manual_seed(seed + 1)
    r = resampler
    with default_dtype(dtype):
        module = _Resampler(dim=r.dim, depth=r.depth, dim_head=r.dim_head, heads=r.heads, num_queries=r.queries,
                            embedding_dim=vision.hidden, output_dim=cross_dim, ff_mult=r.ff_mult)
    tensors = {f"image_proj.{k}": v for k, v in module.state_dict().items()}
    modules = dict(unet.named_modules())
    for index, name in enumerate(unet.attn_processors.keys()):
        if not name.endswith("attn2.processor"):
            continue
        attn = modules[name[: -len(".processor")]]
        tensors[f"ip_adapter.{index}.to_k_ip.weight"] = attn.to_k.weight.detach().to(dtype, copy=True)
        tensors[f"ip_adapter.{index}.to_v_ip.weight"] = attn.to_v.weight.detach().to(dtype, copy=True)
    del unet, modules
    _save(tensors, out_dir / SDXL_PLUS_SUBFOLDER / SDXL_PLUS_WEIGHT)
    return out_dir


def build_tiny_ip_adapter_flux(out_dir: str | Path, num_double_blocks: int = 1, inner_dim: int = 32,
                               seed: int = 0, vision: ClipVisionSize = TINY_VISION,
                               vision_dtype: torch.dtype = torch.float32) -> Path:
    """Write ``{out_dir}/ip_adapter.safetensors`` (XLabs v1 layout) and a tiny CLIP tower with a
    768-wide projection under ``{out_dir}/image_encoder`` (stand-in for ``openai/clip-vit-large-patch14``;
    ``vision``: its width and depth, see :mod:`.sizes`).

    ``num_double_blocks``/``inner_dim`` must match the FLUX transformer it will be loaded into
    (19 / 3072 for FLUX.1-dev; see ``tiny/flux.py``). Stored in fp16.
    """
    out_dir = Path(out_dir)
    build_tiny_clip_vision(out_dir / FLUX_IMAGE_ENCODER_SUBFOLDER, seed=seed, projection_dim=FLUX_CLIP_EMBED_DIM,
                           size=vision, dtype=vision_dtype)
    gen = torch.Generator().manual_seed(seed + 2)

    def rand(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * std).half()

    tensors = {
        "ip_adapter_proj_model.proj.weight": rand(FLUX_NUM_TOKENS * FLUX_TOKEN_DIM, FLUX_CLIP_EMBED_DIM,
                                                  std=FLUX_CLIP_EMBED_DIM**-0.5),
        "ip_adapter_proj_model.proj.bias": rand(FLUX_NUM_TOKENS * FLUX_TOKEN_DIM, std=0.02),
        "ip_adapter_proj_model.norm.weight": 1 + rand(FLUX_TOKEN_DIM, std=0.1),
        "ip_adapter_proj_model.norm.bias": rand(FLUX_TOKEN_DIM, std=0.1),
    }
    for i in range(num_double_blocks):
        for kind in ("k", "v"):
            prefix = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kind}_proj"
            tensors[f"{prefix}.weight"] = rand(inner_dim, FLUX_TOKEN_DIM, std=FLUX_TOKEN_DIM**-0.5)
            tensors[f"{prefix}.bias"] = rand(inner_dim, std=0.02)
    _save(tensors, out_dir / FLUX_WEIGHT)
    return out_dir
