"""T2I-CompBench 2-D spatial score with an open-vocabulary detector: a PROXY for UniDet.

The official metric detects objects with UniDet (a closed-vocabulary detector outside transformers)
and applies a position rule. Here the detector is OWL-ViT / OWLv2 from transformers, queried with
the two object words of the prompt; the rule and the score arithmetic are T2I-CompBench's:
``0.25*conf1 + 0.25*conf2 + position/2`` when both objects are found, ``0.25*conf`` when one is,
0 otherwise, and scores below 0.5 become 0. Detector confidences are on another scale than UniDet's,
so numbers are comparable between arms of one run, not with published tables: reports label this
metric as a proxy.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional

import torch
from PIL import Image
from torch import Tensor
from torchvision.ops import box_convert, box_iou

from ...config.eval import ScorerConfig
from ...errors import Problems
from ...models import check_model, compute_dtype, from_pretrained, resolve_device
from .base import Scorer, register, register_check, rgb
from .checkpoints import model_sha256
from .noun_phrases import rule_noun_phrases

DETECTOR = "google/owlv2-base-patch16-ensemble"  # the open-vocabulary detector standing in for UniDet
# Longest first so "on the left of" wins over shorter matches; T2I-CompBench's locality words.
RELATIONS = ("on the bottom of", "on the right of", "on the left of", "on the top of", "on top of",
             "on side of", "next to", "near")


def parse_spatial_prompt(prompt: str) -> Optional[tuple[str, str, str]]:
    """``"a violin next to a kettle"`` -> ``("violin", "next to", "kettle")``; None when no relation.

    obj1 = the last word of the last noun phrase before the relation, obj2 = the last word of the
    first noun phrase after it (the head nouns).
    """
    low = prompt.lower()
    for rel in RELATIONS:
        m = re.search(rf"\b{re.escape(rel)}\b", low)
        if m:
            left, right = prompt[: m.start()], prompt[m.end() :]
            lp, rp = rule_noun_phrases(left), rule_noun_phrases(right)
            if not lp or not rp:
                return None
            # "on top of" stays itself: T2I-CompBench finds it but its position rule has no branch
            # for it (position 0), and the reference is followed, not corrected
            return lp[-1].split()[-1].lower(), rel, rp[0].split()[-1].lower()
    return None


def position_score(relation: str, box1, box2, iou_threshold: float = 0.1, distance_threshold: float = 150.0) -> float:
    """T2I-CompBench's soft position rule; boxes are (x_min, y_min, x_max, y_max) in pixels, y down."""
    boxes = torch.tensor([box1, box2], dtype=torch.float64)
    (cx1, cy1, _, _), (cx2, cy2, _, _) = box_convert(boxes, "xyxy", "cxcywh").tolist()
    dx, dy = cx2 - cx1, cy2 - cy1
    iou = float(box_iou(boxes[:1], boxes[1:])[0, 0])
    iou = iou if math.isfinite(iou) else 0.0  # two empty boxes: 0 / 0
    if relation in ("next to", "on side of", "near"):
        if abs(dx) < distance_threshold or abs(dy) < distance_threshold:
            return 1.0
        return distance_threshold / max(abs(dx), abs(dy))
    # obj1 left of obj2 <=> obj2's centre is to the right (dx > 0); "top of" <=> obj2 below (dy > 0)
    sign, along, across = {
        "on the left of": (1, dx, dy), "on the right of": (-1, dx, dy),
        "on the top of": (1, dy, dx), "on the bottom of": (-1, dy, dx),
    }.get(relation, (0, 0.0, 0.0))
    if sign == 0 or sign * along <= 0 or abs(along) <= abs(across):
        return 0.0
    return 1.0 if iou < iou_threshold else iou_threshold / iou


def combine(relation: str, det1, det2, distance_threshold: float) -> float:
    """det = (confidence, box) or None; the official 0.25/0.25/0.5 weighting and the 0.5 floor."""
    if det1 is not None and det2 is not None:
        s = 0.25 * det1[0] + 0.25 * det2[0] + position_score(relation, det1[1], det2[1],
                                                             distance_threshold=distance_threshold) / 2
    elif det1 is not None:
        s = 0.25 * det1[0]
    elif det2 is not None:
        s = 0.25 * det2[0]
    else:
        s = 0.0
    return 0.0 if s < 0.5 else s


class SpatialProxyScorer(Scorer):
    def __init__(self, model: Any, processor: Any, device: torch.device, threshold: float = 0.1,
                 reference_size: int = 512, name: str = "spatial_proxy", model_id: str = "", batch_size: int = 8,
                 sha256: Optional[str] = None) -> None:
        self.model = model.eval().to(device)
        self.processor = processor
        self.device = device
        self.threshold = threshold
        self.reference_size = reference_size
        self.name = name
        self.model_id = model_id
        self.batch_size = batch_size
        self.sha256 = sha256
        # OWLv2 pads images to a square (bottom/right) before resizing; OWL-ViT stretches them.
        self.padded = getattr(model.config, "model_type", "") == "owlv2"

    @classmethod
    def from_config(cls, cfg: ScorerConfig) -> SpatialProxyScorer:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        device = resolve_device(cfg.device)
        model_id = cfg.model or DETECTOR
        key = f"scorers[{cfg.name or 'spatial_proxy'}]"
        model = from_pretrained(AutoModelForZeroShotObjectDetection.from_pretrained, "detector", model_id, cfg.path,
                                f"{key}.path", dtype=compute_dtype(cfg.dtype, device))
        processor = from_pretrained(AutoProcessor.from_pretrained, "detector processor", cfg.processor or model_id,
                                    cfg.processor_path or cfg.path, f"{key}.processor_path",
                                    backend=cfg.image_backend.value)
        return cls(model, processor, device, cfg.threshold, cfg.reference_size, cfg.name or "spatial_proxy",
                   model_id, cfg.batch_size, model_sha256(model_id, cfg.path))

    @torch.no_grad()
    def detect(self, image: Image.Image, queries: list[str]) -> list[Optional[tuple[float, tuple]]]:
        """Best box per query (confidence, pixel box) or None below the threshold."""
        dtype = next(self.model.parameters()).dtype
        enc = self.processor(text=[queries], images=image, return_tensors="pt")
        enc = {k: (v.to(self.device, dtype) if k == "pixel_values" else v.to(self.device)) for k, v in enc.items()}
        out = self.model(**enc)
        probs = out.logits[0].float().sigmoid()  # [patches, queries]
        w, h = image.size
        sx, sy = (max(w, h), max(w, h)) if self.padded else (w, h)
        # pred_boxes: [patches, 4] cx, cy, w, h in [0, 1] of the (padded) input -> pixel x0, y0, x1, y1
        boxes = box_convert(out.pred_boxes[0].float(), "cxcywh", "xyxy") * torch.tensor([sx, sy, sx, sy],
                                                                                       device=probs.device)
        dets: list[Optional[tuple[float, tuple]]] = []
        for q in range(len(queries)):
            conf, idx = probs[:, q].max(dim=0)
            if conf.item() < self.threshold:
                dets.append(None)
                continue
            dets.append((conf.item(), tuple(boxes[idx].tolist())))
        return dets

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> Tensor:
        out = []
        for im, p in zip(rgb(images), prompts, strict=True):
            parsed = parse_spatial_prompt(p)
            if parsed is None:
                out.append(0.0)
                continue
            obj1, rel, obj2 = parsed
            d1, d2 = self.detect(im, [obj1, obj2])
            dist = 150.0 * max(im.size) / self.reference_size
            out.append(combine(rel, d1, d2, dist))
        return torch.tensor(out, dtype=torch.float32)

    def info(self) -> dict[str, Any]:
        return {"kind": "spatial_proxy", "model": self.model_id, "sha256": self.sha256, "threshold": self.threshold,
                "exact": False, "scale": "0-1",
                "reference": "T2I-CompBench UniDet_eval (2-D spatial): position rule and score arithmetic",
                "note": "PROXY for T2I-CompBench's UniDet spatial score (an open-vocabulary detector from transformers "
                        "replaces UniDet); compare arms within a report, not with published numbers"}


@register("spatial_proxy")
def _build(cfg: ScorerConfig, **_: Any) -> Scorer:
    return SpatialProxyScorer.from_config(cfg)


@register_check("spatial_proxy")
def _check(cfg: ScorerConfig, key: str, problems: Problems, **_: Any) -> None:
    model_id = cfg.model or DETECTOR
    problems.check(check_model, "detector", model_id, cfg.path, f"{key}.path")
    problems.check(check_model, "detector processor", cfg.processor or model_id, cfg.processor_path or cfg.path,
                   f"{key}.processor_path", marker=None, weights=False)
