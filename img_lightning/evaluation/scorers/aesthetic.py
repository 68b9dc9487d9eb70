"""LAION aesthetic score: the improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor).

As its ``simple_inference.py`` scores an image: OpenAI CLIP ViT-L/14 image embedding (CLIP's own
preprocessing, :mod:`.transforms`), L2-normalised, through an MLP of five linear layers with no
activation between them (``layers.{0,2,4,6,7}``: 768 -> 1024 -> 128 -> 64 -> 16 -> 1; the dropouts
at 1, 3, 5 are inactive at inference). The output is on the AVA rating scale (about 1-10; generated
images mostly score 4-7). The CLIP tower is transformers' port of the same weights
(``openai/clip-vit-large-patch14``); the MLP weights (``sac+logos+ava1-l14-linearMSE.pth``, a plain
state dict) load with ``weights_only=True`` or from ``.safetensors``. The prompt is not used.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from PIL import Image
from torch import Tensor, nn

from ...config.eval import ScorerConfig
from ...errors import Problems
from ...models import ModelNotFoundError, check_model, compute_dtype, from_pretrained, resolve_device
from .base import Scorer, register, register_check
from .checkpoints import CheckpointError, file_sha256, load_state_dict_file, model_sha256, need_file
from .transforms import clip_pixels

CLIP_MODEL = "openai/clip-vit-large-patch14"  # the embedding the released MLP was trained on
MLP_SOURCE = ("sac+logos+ava1-l14-linearMSE.pth from christophschuhmann/improved-aesthetic-predictor, "
              "or a .safetensors of it")
MLP_LINEAR_INDICES = (0, 2, 4, 6, 7)  # nn.Sequential positions of the Linear layers (dropouts between)


def aesthetic_mlp(state: dict[str, Tensor], source: str = "aesthetic MLP") -> nn.Sequential:
    """The predictor's ``layers`` Sequential with ``state`` loaded (strictly); sizes from the weights."""
    state = {k[len("layers."):] if k.startswith("layers.") else k: v for k, v in state.items()}
    want = {f"{i}.{p}" for i in MLP_LINEAR_INDICES for p in ("weight", "bias")}
    if set(state) != want:
        raise CheckpointError(
            f"{source}: not the aesthetic predictor's MLP (expected layers.{{0,2,4,6,7}}.{{weight,bias}}; "
            f"missing {sorted(want - set(state))[:4]}, unexpected {sorted(set(state) - want)[:4]})"
        )
    modules: list[nn.Module] = []
    for pos, i in enumerate(MLP_LINEAR_INDICES):
        out_f, in_f = state[f"{i}.weight"].shape
        modules.append(nn.Linear(in_f, out_f))
        if i + 1 not in MLP_LINEAR_INDICES and pos + 1 < len(MLP_LINEAR_INDICES):
            modules.append(nn.Dropout(0.0))  # the reference's dropouts: identity at inference
    mlp = nn.Sequential(*modules)
    mlp.load_state_dict(state, strict=True)
    if mlp[-1].out_features != 1:
        raise CheckpointError(f"{source}: the last layer has {mlp[-1].out_features} outputs, expected 1")
    return mlp.eval()


class AestheticScorer(Scorer):
    def __init__(self, clip: Any, mlp: nn.Sequential, device: torch.device, *, name: str = "aesthetic",
                 model_id: str = "", batch_size: int = 16, sha256: Optional[str] = None,
                 clip_sha256: Optional[str] = None) -> None:
        self.vision = clip.eval().to(device)  # a CLIPModel: only its image tower runs
        self.mlp = mlp.eval().to(device=device, dtype=torch.float32)  # the reference runs the MLP in float32
        self.device = device
        self.name = name
        self.model_id = model_id
        self.batch_size = batch_size
        self.sha256 = sha256
        self.clip_sha256 = clip_sha256
        self.image_size = int(clip.config.vision_config.image_size)
        dim = int(clip.config.projection_dim)
        if mlp[0].in_features != dim:
            raise CheckpointError(
                f"aesthetic: the MLP takes {mlp[0].in_features}-d embeddings but the CLIP model gives {dim}-d "
                f"(the released MLP needs CLIP ViT-L/14: openai/clip-vit-large-patch14)"
            )

    @classmethod
    def from_config(cls, cfg: ScorerConfig) -> AestheticScorer:
        from transformers import CLIPModel

        key = f"scorers[{cfg.name or 'aesthetic'}]"
        if not cfg.checkpoint:
            raise ModelNotFoundError(f"aesthetic: set {key}.checkpoint to the predictor's MLP weights ({MLP_SOURCE})")
        mlp = aesthetic_mlp(load_state_dict_file(cfg.checkpoint, "aesthetic MLP", f"{key}.checkpoint"), cfg.checkpoint)
        device = resolve_device(cfg.device)
        model_id = cfg.model or CLIP_MODEL
        vision = from_pretrained(CLIPModel.from_pretrained, "CLIP model", model_id, cfg.path,
                                 f"{key}.path", dtype=compute_dtype(cfg.dtype, device))
        return cls(vision, mlp, device, name=cfg.name or "aesthetic", model_id=model_id, batch_size=cfg.batch_size,
                   sha256=file_sha256(cfg.checkpoint), clip_sha256=model_sha256(model_id, cfg.path))

    def embeddings(self, images: list[Image.Image]) -> Tensor:
        """L2-normalised CLIP image embeddings ``[B, D]`` (float32)."""
        dtype = next(self.vision.parameters()).dtype
        pix = clip_pixels(images, self.image_size).to(self.device, dtype)
        emb = self.vision.get_image_features(pixel_values=pix)
        emb = (emb if isinstance(emb, Tensor) else emb.pooler_output).float()
        return emb / emb.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> Tensor:
        return self.mlp(self.embeddings(images))[:, 0]

    def info(self) -> dict[str, Any]:
        return {"kind": "aesthetic", "model": self.model_id, "sha256": self.sha256, "clip_sha256": self.clip_sha256,
                "exact": True, "scale": "AVA rating, about 1-10",
                "reference": "improved-aesthetic-predictor simple_inference.py (MLP on L2-normalised CLIP ViT-L/14 "
                             "image embeddings)"}


@register("aesthetic")
def _build(cfg: ScorerConfig, **_: Any) -> Scorer:
    return AestheticScorer.from_config(cfg)


@register_check("aesthetic")
def _check(cfg: ScorerConfig, key: str, problems: Problems, **_: Any) -> None:
    problems.check(need_file, cfg.checkpoint, "aesthetic predictor's MLP weights", f"{key}.checkpoint", MLP_SOURCE)
    problems.check(check_model, "CLIP model", cfg.model or CLIP_MODEL, cfg.path, f"{key}.path")
