"""IMG's conditioning step: image -> (MLLM guidance, IP tokens) -> aligner x passes -> aligned tokens.

The encoders are the very classes preprocessing used to build the training cache (same config
block, same code), so the aligner sees at inference the features it was trained on. The models are
loaded lazily and can be dropped before re-generation to leave the GPU to the diffusion model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

import torch
from PIL import Image
from torch import Tensor

from ..aligner import ImplicitAligner
from ..config.encoders import EncodersConfig
from ..config.eval import AlignerEvalConfig
from ..errors import NonFiniteError
from ..models import resolve_device

if TYPE_CHECKING:  # loaded lazily: the encoders import transformers
    from ..encoders.ip import IPEncoder
    from ..encoders.mllm import GuidanceEncoder
    from ..encoders.questions import QuestionSet


def pad_guidance(features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Variable-length ``[T_i, D]`` -> ``[B, T_max, D]`` and a bool mask of the real tokens."""
    t_max = max(int(f.shape[0]) for f in features)
    dim = int(features[0].shape[1])
    out = torch.zeros(len(features), t_max, dim, dtype=features[0].dtype)
    mask = torch.zeros(len(features), t_max, dtype=torch.bool)
    for i, f in enumerate(features):
        out[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = True
    return out, mask


class IMGConditioner:
    def __init__(self, encoders_cfg: EncodersConfig, aligner_cfg: AlignerEvalConfig, device: str = "auto",
                 aligner: Optional[ImplicitAligner] = None) -> None:
        """``aligner``: the one ``aligner_cfg`` names, already loaded; else loaded on first use."""
        self.encoders_cfg = encoders_cfg
        self.aligner_cfg = aligner_cfg
        self.device = resolve_device(device)
        self._ip: Optional[IPEncoder] = None
        self._mllm: Optional[GuidanceEncoder] = None
        self._aligner = None if aligner is None else aligner.eval().to(self.device)
        self._questions: Optional[QuestionSet] = None

    # ------------------------------------------------------------------ lazy models
    @property
    def ip(self) -> IPEncoder:
        if self._ip is None:
            from ..encoders.ip import build_ip_encoder

            self._ip = build_ip_encoder(self.encoders_cfg.ip)
        return self._ip

    @property
    def mllm(self) -> GuidanceEncoder:
        if self._mllm is None:
            from ..encoders.mllm import GuidanceEncoder

            self._mllm = GuidanceEncoder.from_config(self.encoders_cfg.mllm)
        return self._mllm

    @property
    def aligner(self) -> ImplicitAligner:
        if self._aligner is None:
            aligner = ImplicitAligner.load_official(self.aligner_cfg.checkpoint, dim_head=self.aligner_cfg.dim_head,
                                                    heads=self.aligner_cfg.heads)
            self._aligner = aligner.eval().to(self.device)
        return self._aligner

    def check_dims(self, token_width: Optional[int] = None) -> None:
        """Fail early, with names, when the aligner does not fit the encoders or the pipeline."""
        dims = self.aligner.dims
        if dims["dim"] != self.ip.dim:
            raise ValueError(
                f"aligner {self.aligner_cfg.checkpoint} works on {dims['dim']}-wide IP tokens but the IP encoder "
                f"({self.encoders_cfg.ip.kind}) gives {self.ip.dim}"
            )
        if token_width is not None and token_width != self.ip.dim:
            raise ValueError(f"the pipeline's IP-Adapter takes {token_width}-wide tokens, "
                             f"the IP encoder gives {self.ip.dim}")

    def template_id(self, key: str) -> int:
        """The question for ``key``, chosen from the configured question set (file or built-in)
        exactly as preprocessing chooses it for a pair id."""
        if self._questions is None:
            from ..encoders.questions import question_set_from_config

            self._questions = question_set_from_config(self.encoders_cfg.mllm)
        return self._questions.index_for(key)

    # ------------------------------------------------------------------ the IMG step
    @torch.no_grad()
    def align(
        self, images: Sequence[Image.Image], prompts: Sequence[str], template_ids: Sequence[int], passes: int
    ) -> tuple[Tensor, Tensor]:
        """Returns (IP tokens of the images, aligned tokens), both ``[B, N, D]`` float32 on CPU."""
        ip_tokens = self.ip.encode(list(images))
        guidance = self.mllm.encode(list(images), list(prompts), list(template_ids))
        if guidance[0].shape[-1] != self.aligner.dims["guidance_dim"]:
            raise ValueError(
                f"aligner expects {self.aligner.dims['guidance_dim']}-wide MLLM features, "
                f"{self.encoders_cfg.mllm.model} gives {guidance[0].shape[-1]}"
            )
        h, mask = pad_guidance(guidance)
        dtype = next(self.aligner.parameters()).dtype
        aligned = self.aligner.refine(
            h.to(self.device, dtype), ip_tokens.to(self.device, dtype), mask.to(self.device), passes=passes
        )
        if not bool(torch.isfinite(aligned).all()):
            raise NonFiniteError(
                f"the aligner {self.aligner_cfg.checkpoint} produced NaN/Inf tokens for prompts "
                f"{[p[:40] for p in prompts]}: it would regenerate black images; check the checkpoint and the "
                f"MLLM features (dtype {self.encoders_cfg.mllm.dtype})"
            )
        return ip_tokens.float().cpu(), aligned.float().cpu()

    def unconditional(self) -> Tensor:
        return self.ip.unconditional().float().cpu()

    def release_encoders(self) -> None:
        self._ip = None
        self._mllm = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
