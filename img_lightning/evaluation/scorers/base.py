"""The one scorer interface: ``score(images, prompts) -> Tensor`` with one score per (image, prompt).

Every metric (HPS v2, PickScore, CLIP, T2I-CompBench's BLIP-VQA / CLIP / spatial / 3-in-1,
ImageReward, the LAION aesthetic predictor, the MLLM grader) is a :class:`Scorer`, built from a
:class:`~img_lightning.config.eval.ScorerConfig` whose model paths are local, so the score stage
runs the same code on tiny test models and on the real checkpoints.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor


class Scorer(ABC):
    """Scores image-prompt pairs; higher is better for every metric we report."""

    name: str = "scorer"
    label: str = ""  # the report's column header (default: name)
    batch_size: int = 16
    abstains: bool = False  # True: NaN means "no score for this image" (e.g. an unparseable MLLM answer)

    @abstractmethod
    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> Tensor:
        """One batch: float32 tensor ``[len(images)]`` on CPU."""

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: {len(images)} images but {len(prompts)} prompts")
        if not images:
            return torch.zeros(0)
        out = [
            self._score_batch(list(images[i : i + self.batch_size]), list(prompts[i : i + self.batch_size]))
            .detach()
            .float()
            .cpu()
            .reshape(-1)
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.cat(out)

    def info(self) -> dict[str, Any]:
        """What the report prints about this metric: kind, model, version, checkpoint sha256, the
        reference implementation, scale, and ``exact`` (False = a proxy, with ``note`` saying why)."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label or self.name, **self.info()}


def rgb(images: Sequence[Image.Image]) -> list[Image.Image]:
    return [im if im.mode == "RGB" else im.convert("RGB") for im in images]


ScorerFactory = Callable[..., Scorer]
REGISTRY: dict[str, ScorerFactory] = {}
# kind -> check(cfg, key, problems, earlier=[names of the scorers listed before]): records in
# ``problems`` what would stop the scorer from building (missing model, processor or checkpoint
# file, bad option), without loading any weights. ``key`` is the entry's config key (scorers.N).
ScorerCheck = Callable[..., None]
CHECKS: dict[str, ScorerCheck] = {}


def register(kind: str) -> Callable[[ScorerFactory], ScorerFactory]:
    def deco(factory: ScorerFactory) -> ScorerFactory:
        REGISTRY[kind] = factory
        return factory

    return deco


def register_check(*kinds: str) -> Callable[[ScorerCheck], ScorerCheck]:
    def deco(check: ScorerCheck) -> ScorerCheck:
        for kind in kinds:
            CHECKS[kind] = check
        return check

    return deco
