"""Pairs of images -> the three cached tensors, with the CPU and model halves kept apart.

:meth:`FeatureExtractor.prepare` does all CPU work (processors, tokenisation) and
:meth:`FeatureExtractor.forward` all model work, so the writer can prepare batch ``i+1`` in a
thread while batch ``i`` runs on the accelerator. Per pair (docs/cache-format.md):

* ``guidance`` - MLLM hidden states for the LOSING image and the pair's question (its exact text,
  ``mllm_prompt``, goes into the sample's metadata);
* ``ip_lose`` / ``ip_win`` - IP tokens of the losing / winning image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, cast

import torch
from PIL import Image
from torch import Tensor

from img_lightning.config.encoders import EncodersConfig
from img_lightning.encoders.ip import IPEncoder, build_ip_encoder
from img_lightning.encoders.mllm import GuidanceEncoder


@dataclass
class PairItem:
    """One decodable pair on its way through the pipeline (images dropped once prepared)."""

    index: int  # global pair index in the PairTable
    pair_id: str
    caption: str
    template_id: int
    meta: dict
    winner: Optional[Image.Image] = None
    loser: Optional[Image.Image] = None


@dataclass
class PreparedBatch:
    items: list[PairItem]
    ip_pixels: Tensor  # [2B, 3, S, S]: losers first, then winners
    mllm_inputs: Any  # processor output for the losers


class FeatureExtractor:
    def __init__(self, mllm: GuidanceEncoder, ip: IPEncoder) -> None:
        self.mllm = mllm
        self.ip = ip

    @classmethod
    def from_config(cls, encoders_cfg: EncodersConfig) -> FeatureExtractor:
        return cls(GuidanceEncoder.from_config(encoders_cfg.mllm), build_ip_encoder(encoders_cfg.ip))

    @property
    def template_set(self) -> str:
        return self.mllm.template_set

    @property
    def questions_sha256(self) -> str:
        return self.mllm.questions.sha256

    @property
    def batch_size(self) -> int:
        """Pairs per prepared batch: one MLLM batch (the expensive model)."""
        return self.mllm.batch_size

    def template_id(self, pair_id: str) -> int:
        """Index of the pair's question in the question set (a stable hash of the pair id)."""
        return self.mllm.question_index(pair_id)

    def mllm_prompt(self, caption: str, template_id: int) -> str:
        """The exact text the MLLM reads for this pair (raises PromptTextError if unusable, its
        subclass PromptTooLong when it does not fit the MLLM's context)."""
        text = self.mllm.prompt_text(caption, template_id)
        self.mllm.check_length(text)
        return text

    def prepare(self, items: list[PairItem]) -> PreparedBatch:
        # Only decodable pairs reach the encoders: both images are set.
        losers = cast(list[Image.Image], [it.loser for it in items])
        pixels = self.ip.prepare(losers + cast(list[Image.Image], [it.winner for it in items]))
        mllm_inputs = self.mllm.prepare(losers, [it.caption for it in items], [it.template_id for it in items])
        for it in items:
            it.winner = it.loser = None
        return PreparedBatch(items=items, ip_pixels=pixels, mllm_inputs=mllm_inputs)

    def forward(self, batch: PreparedBatch) -> list[dict[str, Tensor]]:
        """float32 CPU tensors per pair: ``guidance`` [T, Dg], ``ip_lose`` [N, D], ``ip_win`` [N, D]."""
        n = len(batch.items)
        step = self.ip.batch_size
        tokens = torch.cat([self.ip.forward(batch.ip_pixels[i : i + step]) for i in range(0, 2 * n, step)])
        guidance = self.mllm.forward(batch.mllm_inputs)
        return [{"guidance": guidance[j], "ip_lose": tokens[j], "ip_win": tokens[n + j]} for j in range(n)]
