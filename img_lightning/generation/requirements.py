"""Everything the generate stage will load, checked before its first image.

:func:`check_generation` finds the diffusion pipeline (and a separate UNet), the IP-Adapter, the IP
encoder and the MLLM without loading their weights, loads the aligner (small next to the rest; a
wrong or damaged file is better found now than after the base images), and compares the widths
they must share: the aligner's token width with the IP encoder's tokens and the adapter's key
projections, its guidance width with the MLLM's hidden states. Problems go into one
:class:`~img_lightning.errors.Problems`, each naming the config key to fix.
"""

from __future__ import annotations

import json
import logging
from typing import Optional

from ..aligner import ImplicitAligner, recorded_passes
from ..config.eval import AlignerEvalConfig, EvalConfig, IPAdapterConfig, PipelineConfig
from ..config.loading import ConfigError
from ..encoders.checks import adapter_file, adapter_widths, check_ip_encoder, check_mllm
from ..errors import Problems
from ..models import ModelNotFoundError, check_model

log = logging.getLogger(__name__)

def check_generation_config(cfg: EvalConfig) -> None:
    """Settings the pipelines cannot honour, as one clear error before any model is loaded."""
    kind, s, img = cfg.generation.pipeline.kind, cfg.generation.sampler, cfg.img
    if kind == "sdxl":
        if img.negative_ip_scale is not None:
            raise ConfigError("img.negative_ip_scale is FLUX-only: SDXL applies one IP scale to both CFG halves "
                              "in one UNet pass; leave it unset (null)")
        if s.true_cfg_scale != 1.0 or s.true_cfg_start_step != 0:
            raise ConfigError("generation.sampler.true_cfg_scale/true_cfg_start_step are FLUX-only "
                              "(SDXL's guidance_scale is already real CFG)")
    if s.true_cfg_start_step < 0:
        raise ConfigError(f"generation.sampler.true_cfg_start_step must be >= 0, got {s.true_cfg_start_step}")
    fmt = getattr(cfg.generation.image_format, "value", cfg.generation.image_format)
    if img.rounds >= 1 and fmt != "png":
        # Round r reads round r-1's stored image (base for r = 1) to compute the MLLM and IP features;
        # the demos compute them from the generated image itself. Only a lossless file is that image.
        raise ConfigError(f"generation.image_format: {fmt} is lossy, and each IMG round computes the aligner's "
                          f"inputs (MLLM and IP features) from the stored image of the round before (the base "
                          f"image first), which would then differ from the generated one the released demos "
                          f"use; use png (lossless), or img.rounds=0 for base images only")


def check_pipeline(cfg: PipelineConfig, problems: Problems, key: str = "generation.pipeline") -> None:
    """The pipeline folder with every component its ``model_index.json`` lists, and the UNet."""
    root = problems.check(check_model, f"{cfg.kind.upper()} pipeline", cfg.model, cfg.path, f"{key}.path",
                          revision=cfg.revision, marker="model_index.json", weights=False)
    if root is not None:
        index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
        for name, spec in index.items():
            listed = isinstance(spec, list) and len(spec) == 2 and spec[0] is not None
            if listed and not name.startswith("_") and not (root / name).is_dir():
                problems.add(f"{key}.path: the pipeline {root} lists the component {name!r} but has no {name}/ "
                             f"folder; the download is incomplete")
    if cfg.unet or cfg.unet_path:
        problems.check(check_model, "UNet", cfg.unet or "", cfg.unet_path, f"{key}.unet_path", revision=cfg.revision,
                       subfolder=cfg.unet_subfolder or "")


def check_ip_adapter(cfg: IPAdapterConfig, problems: Problems, key: str = "img.ip_adapter") -> Optional[int]:
    """The adapter file the pipeline loads; returns the width of the tokens its layers read."""
    file = problems.check(adapter_file, "IP-Adapter", cfg.model, cfg.path, cfg.subfolder, cfg.weight_name,
                          f"{key}.path")
    widths = None if file is None else problems.check(adapter_widths, file)
    if widths is not None and widths["attention"] is None:
        problems.add(f"{key}: {file} has no IP attention layers (to_k_ip / ip_adapter_double_stream_k_proj)")
    return None if widths is None else widths["attention"]


def load_aligner(cfg: AlignerEvalConfig) -> ImplicitAligner:
    """The configured aligner (``img.aligner``), on the CPU, with its dims checked against the file."""
    try:
        aligner = ImplicitAligner.load_official(cfg.checkpoint, dim_head=cfg.dim_head, heads=cfg.heads)
    except FileNotFoundError:
        raise ModelNotFoundError(f"img.aligner.checkpoint: {cfg.checkpoint} does not exist") from None
    trained_for = recorded_passes(cfg.checkpoint)
    if trained_for is not None and trained_for != int(cfg.passes):
        log.warning("img.aligner.passes=%d, but %s was exported for %d passes (model.passes of its training "
                    "config); set img.aligner.passes=%d unless the difference is the point", cfg.passes,
                    cfg.checkpoint, trained_for, trained_for)
    return aligner


def check_generation(cfg: EvalConfig, problems: Problems) -> Optional[ImplicitAligner]:
    """Every model of the generate stage; returns the loaded aligner (None if it could not be)."""
    problems.check(check_generation_config, cfg)
    problems.check(check_pipeline, cfg.generation.pipeline, problems)
    adapter_width = problems.check(check_ip_adapter, cfg.img.ip_adapter, problems)
    token_width = problems.check(check_ip_encoder, cfg.encoders.ip, problems)
    hidden = problems.check(check_mllm, cfg.encoders.mllm, problems)
    aligner = problems.check(load_aligner, cfg.img.aligner, where="img.aligner.checkpoint")
    if token_width is not None and adapter_width is not None and token_width != adapter_width:
        problems.add(f"img.ip_adapter: its layers read {adapter_width}-wide tokens but the IP encoder "
                     f"(encoders.ip) gives {token_width}-wide ones; use the adapter the encoder's features belong to")
    if aligner is not None:
        dims, ckpt = aligner.dims, cfg.img.aligner.checkpoint
        if token_width is not None and dims["dim"] != token_width:
            problems.add(f"img.aligner.checkpoint: {ckpt} works on {dims['dim']}-wide IP tokens but the IP encoder "
                         f"(encoders.ip, kind {cfg.encoders.ip.kind}) gives {token_width}-wide ones")
        if hidden is not None and dims["guidance_dim"] != hidden:
            problems.add(f"img.aligner.checkpoint: {ckpt} expects {dims['guidance_dim']}-wide MLLM features but "
                         f"the MLLM (encoders.mllm, {cfg.encoders.mllm.model}) gives {hidden}-wide ones")
    return aligner
