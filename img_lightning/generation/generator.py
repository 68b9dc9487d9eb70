"""The generation steps on images in memory: base image, IMG step, re-generation, control.

:class:`IMGGenerator` is the one implementation of what an image of each arm is made with, shared
by the resumable ``img-eval generate`` stage (:class:`~.runner.GenerationRun`, which stores the
images of a run directory) and by :class:`~.refiner.IMGRefiner` / ``img-generate`` (one prompt or
image in, its refinements out), so the same prompt and seed give the same image through either.

- base: the pipeline with ``generation.base`` (the demos' plain call); with the IP-Adapter loaded,
  at IP scale 0, which is exactly the pipeline without it (see :meth:`DiffusionBackend.generate`);
- IMG step: the source image -> MLLM guidance (one question of the configured set, chosen by the
  prompt, seed and round) + IP tokens -> the aligner ``img.aligner.passes`` times -> aligned tokens;
- re-generation: the same prompt and seed, conditioned on the aligned tokens at ``img.ip_scale``
  with the re-generation settings of ``img`` (negative prompt, negative IP image and scale);
- control: the re-generation settings at IP scale 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from PIL import Image

from ..aligner import ImplicitAligner
from ..config.eval import EvalConfig
from .conditioner import IMGConditioner
from .pipeline import DiffusionBackend


def enum_value(value: Any) -> str:
    return value.value if hasattr(value, "value") else str(value)


def question_key(prompt: str, seed: int, round_index: int) -> str:
    """What picks the MLLM's question for an IMG round: the prompt, the seed and the round, i.e.
    what makes the image (so ``img-eval`` and ``img-generate`` ask the same for the same image)."""
    return f"{int(seed)}/r{int(round_index)}/{prompt}"


class IMGGenerator:
    def __init__(self, cfg: EvalConfig, aligner: Optional[ImplicitAligner] = None) -> None:
        """``cfg``: a resolved evaluation config; ``aligner``: the configured one, already loaded (by
        the checks before a run), else loaded when the first IMG step needs it."""
        self.cfg = cfg
        self._aligner = aligner
        self._backend: Optional[DiffusionBackend] = None
        self._conditioner: Optional[IMGConditioner] = None
        self._uncond: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ models, loaded once
    @property
    def backend(self) -> DiffusionBackend:
        if self._backend is None:
            self._backend = DiffusionBackend.from_config(self.cfg.generation.pipeline)
        return self._backend

    @property
    def conditioner(self) -> IMGConditioner:
        if self._conditioner is None:
            self._conditioner = IMGConditioner(self.cfg.encoders, self.cfg.img.aligner,
                                               self.cfg.generation.pipeline.device, aligner=self._aligner)
        return self._conditioner

    def ensure_adapter(self) -> None:
        if not self.backend.ip_loaded:
            self.backend.load_ip_adapter(self.cfg.img.ip_adapter)

    def release_encoders(self) -> None:
        """Drop the MLLM and the IP encoder (``img.free_encoders``: the GPU for the diffusion model)."""
        if self._conditioner is not None:
            self._conditioner.release_encoders()

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    # ------------------------------------------------------------------ the steps
    def base(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        g = self.cfg.generation
        return list(self.backend.generate(list(prompts), list(seeds), g.sampler,
                                          negative_prompt=g.base.negative_prompt))

    def question(self, prompt: str, seed: int, round_index: int) -> int:
        """The index of the MLLM's question, chosen from the configured set as preprocessing chooses
        it for a pair id."""
        return self.conditioner.template_id(question_key(prompt, seed, round_index))

    def align(self, images: Sequence[Image.Image], prompts: Sequence[str], seeds: Sequence[int],
              round_index: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """IP tokens of ``images``, their aligned tokens (both ``[B, N, D]`` float32 on CPU) and the
        question asked for each."""
        self.conditioner.check_dims(self.backend.token_width())
        tids = [self.question(p, s, round_index) for p, s in zip(prompts, seeds, strict=True)]
        ip, aligned = self.conditioner.align(list(images), list(prompts), tids, self.cfg.img.aligner.passes)
        return ip, aligned, tids

    def unconditional(self) -> torch.Tensor:
        """The re-generation's negative IP tokens (``img.negative_ip_image``), computed once."""
        if self._uncond is None:
            mode = enum_value(self.cfg.img.negative_ip_image)
            # conditioner.ip is the very IP encoder of the features (the recipe's encoders block)
            self._uncond = self.conditioner.ip.unconditional(mode).float().cpu()
        return self._uncond

    def regenerate(self, prompts: Sequence[str], seeds: Sequence[int], tokens: torch.Tensor,
                   ip_scale: float) -> list[Image.Image]:
        """The re-generation call shared by the IMG rounds and the control arm."""
        img = self.cfg.img
        self.ensure_adapter()
        self.backend.set_ip_scale(ip_scale)
        neg_scale = img.negative_ip_scale  # None: follows ip_scale (SDXL always)
        return list(self.backend.generate(list(prompts), list(seeds), self.cfg.generation.sampler,
                                          negative_prompt=img.negative_prompt, ip_tokens=tokens,
                                          negative_ip_tokens=self.unconditional(), negative_ip_scale=neg_scale))

    def control(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        """The re-generation settings at IP scale 0 (the positive IP pass is off: its tokens do not matter)."""
        uncond = self.unconditional()
        return self.regenerate(prompts, seeds, uncond[None].expand(len(prompts), *uncond.shape), 0.0)
