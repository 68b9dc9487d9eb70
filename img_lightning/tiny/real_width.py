"""The real-width world: the released models' widths with very few layers, in the real formats.

Every stage has run on tiny models 32-64 channels wide; shapes, dtypes, memory and time that only
appear at the real widths had not. These builders use the widths of :mod:`.sizes`:

* ``llava``: LLaVA-1.5-13B in the llava-hf layout - Llama hidden 5120, intermediate 13824, 40 heads,
  vocabulary 32064, 1 decoder layer; CLIP ViT-L/14-336 (1024 wide, 577 tokens, 2 layers); the
  2-layer GELU projector 1024 -> 5120 -> 5120;
* ``sdxl``: SDXL with channels 320/640/1280, cross-attention 2048 (text encoders 768 + 1280 wide,
  1-2 layers, tiny vocabularies), one block per level, SDXL's VAE (8x);
* ``ip_adapter``: IP-Adapter-Plus SDXL at real size - ViT-H/14 tower 1280 wide (2 layers, 257
  tokens), the resampler (dim 1280, depth 4, 20 heads of 64, 16 queries) -> 16 x 2048, and
  ``to_k_ip``/``to_v_ip`` for every cross-attention of the UNet above;
* ``flux`` + ``flux_ip_adapter``: FLUX.1-dev's transformer 3072 wide with one double- and one
  single-stream block, 16 latent channels, and an XLabs v1 adapter (4 x 4096 tokens) for it;
* ``aligner``: the IMG aligner at paper size (guidance 5120, dim 2048, depth 4, 20 heads of 64) in
  the official ``.pth`` layout, with a non-zero output layer (not the identity).

Weights are random and stored in bfloat16 (as the released checkpoints store 16-bit weights; half the
disk). Built once into a folder and reused: about 4.6 GB on disk, ~3.4 GB peak RSS while building,
about a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .sizes import (
    ALIGNER_SDXL,
    IP_PLUS_RESAMPLER,
    REAL_WIDTH_FLUX,
    REAL_WIDTH_FLUX_IP_VISION,
    REAL_WIDTH_IP_VISION,
    REAL_WIDTH_LLAVA,
    REAL_WIDTH_SDXL,
    AlignerSize,
)

DTYPE = torch.bfloat16
NAMES = ("llava", "sdxl", "ip_adapter", "flux", "flux_ip_adapter", "aligner")


def build_real_width_aligner(path: str | Path, size: AlignerSize = ALIGNER_SDXL, seed: int = 0) -> Path:
    """The aligner at ``size`` in the official ``.pth`` layout, every weight random (``zero_linear``
    too, so its output differs from its input and a pass that drops it shows)."""
    from ..aligner import ImplicitAligner

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        aligner = ImplicitAligner(size.guidance_dim, size.dim, size.depth, size.heads, size.dim_head, size.ff_mult)
        with torch.no_grad():
            aligner.zero_linear.weight.normal_(0.0, 0.02)
    path = Path(path)
    aligner.save_official(path)
    # the head split (heads x dim_head) is not in the shapes: record the dims beside it, as exports do
    path.with_suffix(".json").write_text(json.dumps(aligner.dims, indent=1) + "\n")
    return path


def _complete(paths: dict[str, Path]) -> dict[str, bool]:
    from .ip_adapter import FLUX_WEIGHT, SDXL_PLUS_SUBFOLDER, SDXL_PLUS_WEIGHT

    return {
        "llava": all((paths["llava"] / f).is_file() for f in ("config.json", "tokenizer_config.json")),
        "sdxl": all((paths["sdxl"] / f).is_file() for f in ("model_index.json", "unet/config.json", "vae/config.json")),
        "ip_adapter": (paths["ip_adapter"] / SDXL_PLUS_SUBFOLDER / SDXL_PLUS_WEIGHT).is_file(),
        "flux": (paths["flux"] / "model_index.json").is_file(),
        "flux_ip_adapter": (paths["flux_ip_adapter"] / FLUX_WEIGHT).is_file(),
        "aligner": paths["aligner"].with_suffix(".json").is_file(),
    }


def build_real_width_world(root: str | Path, only: Optional[tuple[str, ...]] = None, seed: int = 0,
                           log=print) -> dict[str, Path]:
    """Build (or reuse what is complete) the real-width models under ``root``; ``only``: a subset of
    :data:`NAMES` (``ip_adapter`` needs ``sdxl``). Returns every model's path by name."""
    from .flux import build_tiny_flux
    from .ip_adapter import build_tiny_ip_adapter_flux, build_tiny_ip_adapter_plus_sdxl
    from .mllm import build_tiny_llava
    from .sdxl import build_tiny_sdxl

    root = Path(root)
    paths = {name: root / name for name in NAMES}
    paths["aligner"] = root / "aligner" / "aligner_sdxl.pth"
    wanted = set(only or NAMES)
    if "ip_adapter" in wanted:
        wanted.add("sdxl")
    done = _complete(paths)
    builders = {
        "llava": lambda: build_tiny_llava(paths["llava"], seed=seed, size=REAL_WIDTH_LLAVA, dtype=DTYPE),
        "sdxl": lambda: build_tiny_sdxl(paths["sdxl"], seed=seed, size=REAL_WIDTH_SDXL, dtype=DTYPE),
        "ip_adapter": lambda: build_tiny_ip_adapter_plus_sdxl(paths["ip_adapter"], paths["sdxl"], seed=seed,
                                                              vision=REAL_WIDTH_IP_VISION,
                                                              resampler=IP_PLUS_RESAMPLER, dtype=DTYPE),
        "flux": lambda: build_tiny_flux(paths["flux"], seed=seed, size=REAL_WIDTH_FLUX, dtype=DTYPE),
        "flux_ip_adapter": lambda: build_tiny_ip_adapter_flux(
            paths["flux_ip_adapter"], num_double_blocks=REAL_WIDTH_FLUX.double_blocks,
            inner_dim=REAL_WIDTH_FLUX.inner_dim, seed=seed, vision=REAL_WIDTH_FLUX_IP_VISION, vision_dtype=DTYPE),
        "aligner": lambda: build_real_width_aligner(paths["aligner"], seed=seed),
    }
    for name in NAMES:  # this order: the IP-Adapter reads the SDXL UNet
        if name in wanted and not done[name]:
            log(f"   building {name} (real width) ...")
            builders[name]()
    return paths
