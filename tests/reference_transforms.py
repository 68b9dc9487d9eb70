"""Reference preprocessing written out with PIL + numpy, independent of the code under test."""

import numpy as np
import torch
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _normalise(arr: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(arr).permute(2, 0, 1)
    return (x - torch.tensor(OPENAI_MEAN)[:, None, None]) / torch.tensor(OPENAI_STD)[:, None, None]


def _short_side_resize(im: Image.Image, n: int) -> Image.Image:
    w, h = im.size
    size = (n, int(n * h / w)) if w <= h else (int(n * w / h), n)
    return im.convert("RGB").resize(size, Image.BICUBIC)


def clip_reference_pixels(im: Image.Image, n: int) -> torch.Tensor:
    """OpenAI CLIP's transform (clip.load; ImageReward's and the aesthetic predictor's): short side
    to n (bicubic on the PIL image, long side truncated), centre crop at round((d - n) / 2),
    [0, 1], OpenAI mean/std."""
    r = _short_side_resize(im, n)
    left, top = int(round((r.width - n) / 2.0)), int(round((r.height - n) / 2.0))
    return _normalise(np.asarray(r.crop((left, top, left + n, top + n)), dtype=np.float32) / 255.0)


def hf_pil_pixels(im: Image.Image, n: int) -> torch.Tensor:
    """transformers' PIL-backend CLIP image processor: the same resize, crop offset (d - n) // 2."""
    r = _short_side_resize(im, n)
    left, top = (r.width - n) // 2, (r.height - n) // 2
    return _normalise(np.asarray(r.crop((left, top, left + n, top + n)), dtype=np.float32) / 255.0)


def batch(fn, images, n: int) -> torch.Tensor:
    return torch.stack([fn(im, n) for im in images])
