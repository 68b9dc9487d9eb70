"""CLIP-family scorers on transformers' ``CLIPModel``.

- PickScore: ``yuvalkirstain/PickScore_v1`` weights with the CLIP-H processor
  (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``) as PickScore's own code runs it (transformers'
  processor; its image backend pinned to PIL, the backend that code ran on); score =
  ``logit_scale.exp() * cosine``.
- CLIP score: ``scale * cosine`` (default ``100 * max(cos, 0)``, the CLIPScore convention) with
  OpenAI CLIP's own preprocessing (``clip.load``), as CLIPScore-style evaluation code runs it.
- T2I-CompBench non-spatial: CLIP ViT-B/32, plain cosine (``scale=1``, no clamp), with OpenAI
  CLIP's preprocessing (T2I-CompBench's ``CLIP_similarity.py`` uses the ``clip`` package).

Texts go through the model's CLIP tokenizer (the same BPE as the ``clip`` package), truncated to 77.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from PIL import Image
from torch import Tensor

from ...config.eval import ScorerConfig
from ...errors import Problems
from ...models import check_model, compute_dtype, from_pretrained, resolve_device
from .base import Scorer, register, register_check, rgb
from .checkpoints import model_sha256
from .transforms import clip_pixels

PROCESSOR = "processor"  # transformers' CLIP image processor (PIL backend unless configured)
OPENAI_CLIP = "openai_clip"  # OpenAI CLIP's clip.load transform (transforms.py)


# kind -> (default model, default processor): a processor of its own (PickScore) or the model's
DEFAULTS = {
    "pickscore": ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    "clip": ("openai/clip-vit-large-patch14", None),
    "t2i_non_spatial": ("openai/clip-vit-base-patch32", None),
}


def sources(cfg: ScorerConfig) -> tuple[str, Optional[str], str, Optional[str]]:
    """``(model id, model path, processor id, processor path)`` a CLIP-family scorer loads."""
    default_model, default_processor = DEFAULTS[cfg.kind]
    model_id = cfg.model or default_model
    proc_id = cfg.processor or default_processor or model_id
    proc_path = cfg.processor_path or (cfg.path if not (cfg.processor or default_processor) else None)
    return model_id, cfg.path, proc_id, proc_path


def _pooled(out: Any) -> Tensor:
    """``get_*_features`` returns a tensor (transformers 4.x) or an output with ``pooler_output`` (5.x)."""
    return out if isinstance(out, Tensor) else out.pooler_output


class CLIPPairScorer(Scorer):
    """Cosine of projected image and text embeddings, times a fixed or the learned logit scale."""

    def __init__(
        self, model: Any, processor: Any, device: torch.device, *, scale: Optional[float], clamp_zero: bool,
        name: str, model_id: str, batch_size: int = 16, preprocess: str = PROCESSOR, kind: str = "clip",
        reference: str = "", sha256: Optional[str] = None,
    ) -> None:
        self.model = model.eval().to(device)
        self.processor = processor
        self.device = device
        self.scale = scale  # None: the model's logit_scale.exp() (PickScore)
        self.clamp_zero = clamp_zero
        self.name = name
        self.model_id = model_id
        self.batch_size = batch_size
        if preprocess not in (PROCESSOR, OPENAI_CLIP):
            raise ValueError(f"unknown CLIP preprocessing {preprocess!r}")
        self.preprocess = preprocess
        self.kind = kind
        self.reference = reference
        self.sha256 = sha256
        self.image_size = int(model.config.vision_config.image_size)

    @classmethod
    def load(cls, cfg: ScorerConfig, *, scale: Optional[float], clamp_zero: bool, default_name: str, preprocess: str,
             reference: str) -> CLIPPairScorer:
        from transformers import CLIPModel, CLIPProcessor

        device = resolve_device(cfg.device)
        model_id, _, proc_id, proc_path = sources(cfg)
        key = f"scorers[{cfg.name or default_name}]"
        model = from_pretrained(
            CLIPModel.from_pretrained, "CLIP model", model_id, cfg.path, f"{key}.path",
            dtype=compute_dtype(cfg.dtype, device),
        )
        processor = from_pretrained(CLIPProcessor.from_pretrained, "CLIP processor", proc_id, proc_path,
                                    f"{key}.processor_path", backend=cfg.image_backend.value)
        return cls(model, processor, device, scale=scale, clamp_zero=clamp_zero, name=cfg.name or default_name,
                   model_id=model_id, batch_size=cfg.batch_size, preprocess=preprocess, kind=cfg.kind,
                   reference=reference, sha256=model_sha256(model_id, cfg.path))

    def pixel_values(self, images: list[Image.Image]) -> Tensor:
        """``[B, 3, H, W]`` float32 model input of ``images`` (CPU)."""
        if self.preprocess == OPENAI_CLIP:
            return clip_pixels(images, self.image_size)
        return self.processor(images=rgb(images), return_tensors="pt")["pixel_values"]

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> Tensor:
        dtype = next(self.model.parameters()).dtype
        pix = self.pixel_values(images).to(self.device, dtype)
        txt = self.processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        img_emb = _pooled(self.model.get_image_features(pixel_values=pix)).float()
        txt_emb = _pooled(self.model.get_text_features(
            input_ids=txt["input_ids"].to(self.device), attention_mask=txt["attention_mask"].to(self.device)
        )).float()
        cos = torch.nn.functional.cosine_similarity(img_emb, txt_emb, dim=-1)
        if self.clamp_zero:
            cos = cos.clamp_min(0)
        scale = self.model.logit_scale.exp().float() if self.scale is None else self.scale
        return cos * scale

    def info(self) -> dict[str, Any]:
        backend = type(getattr(self.processor, "image_processor", None)).__name__
        scale = "logit_scale.exp()" if self.scale is None else self.scale
        return {"kind": self.kind, "model": self.model_id, "sha256": self.sha256, "reference": self.reference,
                "scale": f"{scale} x {'max(cos, 0)' if self.clamp_zero else 'cos'}", "exact": True,
                "preprocess": f"{self.preprocess} ({backend})" if self.preprocess == PROCESSOR else self.preprocess}


@register("pickscore")
def _pickscore(cfg: ScorerConfig, **_: Any) -> Scorer:
    return CLIPPairScorer.load(
        cfg, scale=cfg.scale, clamp_zero=bool(cfg.clamp_zero), default_name="pickscore", preprocess=PROCESSOR,
        reference="PickScore (yuvalkirstain/PickScore): logit_scale.exp() x cosine, transformers CLIP processor",
    )


@register("clip")
def _clip(cfg: ScorerConfig, **_: Any) -> Scorer:
    return CLIPPairScorer.load(
        cfg, scale=100.0 if cfg.scale is None else cfg.scale,
        clamp_zero=True if cfg.clamp_zero is None else cfg.clamp_zero, default_name="clip", preprocess=OPENAI_CLIP,
        reference="CLIPScore (Hessel et al.) with OpenAI CLIP's preprocessing",
    )


@register("t2i_non_spatial")
def _non_spatial(cfg: ScorerConfig, **_: Any) -> Scorer:
    return CLIPPairScorer.load(
        cfg, scale=1.0 if cfg.scale is None else cfg.scale,
        clamp_zero=False if cfg.clamp_zero is None else cfg.clamp_zero, default_name="non_spatial",
        preprocess=OPENAI_CLIP, reference="T2I-CompBench CLIPScore_eval/CLIP_similarity.py (CLIP ViT-B/32 cosine)",
    )


@register_check(*DEFAULTS)
def _check(cfg: ScorerConfig, key: str, problems: Problems, **_: Any) -> None:
    model_id, path, proc_id, proc_path = sources(cfg)
    problems.check(check_model, "CLIP model", model_id, path, f"{key}.path")
    problems.check(check_model, "CLIP processor", proc_id, proc_path, f"{key}.processor_path", marker=None,
                   weights=False)
