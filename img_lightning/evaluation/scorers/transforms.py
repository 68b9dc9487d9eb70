"""OpenAI CLIP's evaluation preprocessing, the one ImageReward, the LAION aesthetic predictor and
the CLIP scores of T2I-CompBench and Diffusion-Sharpening feed their models.

``clip.load``'s transform: resize the SHORT side to ``n`` (bicubic, on the PIL image), centre crop
``n x n``, RGB, to tensor, OpenAI mean/std. Written with torchvision's PIL path, as the reference
is, so no antialias default or image-processor backend can change it; transformers' CLIP image
processor differs from it by one pixel of crop offset when the margin is odd.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torchvision.transforms as T
from PIL import Image
from torch import Tensor

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def clip_reference_transform(n_px: int) -> Callable[[Image.Image], Tensor]:
    return T.Compose([
        T.Resize(n_px, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(n_px),
        _to_rgb,
        T.ToTensor(),
        T.Normalize(OPENAI_MEAN, OPENAI_STD),
    ])


def clip_pixels(images: Sequence[Image.Image], n_px: int) -> Tensor:
    """``[B, 3, n, n]`` float32 pixels of ``images`` through :func:`clip_reference_transform`."""
    tf = clip_reference_transform(n_px)
    return torch.stack([tf(im) for im in images])
