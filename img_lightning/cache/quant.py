"""8-bit guidance: float8_e4m3fn with one float32 scale per token, the largest channels kept
16-bit, and the way back.

Why: the MLLM guidance is ~98 % of a cache's bytes, and training is bound by reading them. Storing
it as FP8 halves the bytes that disk, page cache, loader, pinned buffers and PCIe move; the
multiply back to float happens on the device after the copy (:func:`dequantize_batch`).

Scheme, per sample ``x = guidance [T, D]``:

* **Outlier channels.** The ``K`` channels with the largest magnitude over the sample's tokens
  are stored as they would be in a 16-bit cache (``guidance_outlier [T, K]`` at
  ``guidance_outlier_index [K]``) and zeroed in the 8-bit part. LLaMA-family hidden states carry
  a few "massive activation" channels hundreds of times larger than the rest; they dominate each
  token's norm, and E4M3's 3 mantissa bits would round them by up to 6 %. With ``K = 0`` those
  errors move the full-size aligner's output ~40x more (``benchmarks/fp8_fidelity.py``).
* **Per-token scales.** Every remaining row gets ``scale = max|x| / 448`` (448 is the largest
  float8_e4m3fn), ``q = fp8(x / scale)``, so each token uses the format's full range and the
  token-to-token norm differences of LLM states cost nothing. E4M3 keeps 3 mantissa bits over
  2^-6 .. 448: a relative rounding error <= 2^-4 for every value within a factor ~28,000 of its
  row's maximum, an absolute error <= scale * 2^-10 below that.

Special rows: an all-zero row gets scale 1 (q = 0, exact); a row whose maximum is below 448 x the
smallest normal float32 (~5e-36) gets that smallest normal (~1.2e-38) as its scale, so no scale is
ever 0 or subnormal and the same bound holds (absolute error <= 2^-4 |x| + 1.2e-41). Very large rows
(up to float32's maximum) keep a finite scale. NaN/Inf inputs are refused, naming the sample: the
float8 conversion would silently saturate an Inf to 448.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor

from .finite import has_nonfinite
from .format import FP8_DTYPE, INDEX_DTYPE, OUTLIER_INDEX_KEY, OUTLIER_KEY, QUANT_KEYS, SCALE_DTYPE, SCALE_KEY

FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
DEFAULT_OUTLIER_CHANNELS = 8
_TINY = float(torch.finfo(SCALE_DTYPE).tiny)


class NonFiniteFeatures(ValueError):
    """A sample's features hold NaN/Inf (or overflow the storage dtype); the message names it."""


def _refuse_nonfinite(x: Tensor, where: str) -> None:
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        rows = (~finite).any(1).nonzero().flatten().tolist()
        raise NonFiniteFeatures(
            f"{where}: {int((~finite).sum())} NaN/Inf values in {len(rows)} token(s) (first: token {rows[0]}); "
            f"8-bit guidance cannot store them"
        )


def quantize_fp8(x: Tensor, where: str = "guidance") -> tuple[Tensor, Tensor]:
    """Per-token absmax: ``x [T, D]`` -> ``(q [T, D] float8_e4m3fn, scale [T] float32)``."""
    if x.ndim != 2:
        raise ValueError(f"{where}: expected [T, D], got shape {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float32)
    _refuse_nonfinite(x, where)
    absmax = x.abs().amax(1) if x.shape[1] else x.new_zeros(x.shape[0])
    scale = torch.where(absmax > 0, (absmax / FP8_MAX).clamp_min(_TINY), torch.ones_like(absmax))
    q = (x / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_fp8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``q [..., T, D]`` and ``scale [..., T]`` -> values in ``dtype`` (runs where the tensors are)."""
    return q.to(dtype) * scale.to(dtype).unsqueeze(-1)


def quantize_guidance(x: Tensor, where: str = "guidance", outlier_channels: int = DEFAULT_OUTLIER_CHANNELS,
                      outlier_dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
    """``x [T, D]`` -> the tensors a sample stores for 8-bit guidance (see the module docstring).

    ``outlier_dtype``: the cache's 16-bit dtype; an outlier that overflows it is refused like a
    16-bit cache refuses it.
    """
    if x.ndim != 2:
        raise ValueError(f"{where}: expected [T, D], got shape {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float32)
    _refuse_nonfinite(x, where)
    k = min(int(outlier_channels), x.shape[1])
    if k <= 0:
        q, scale = quantize_fp8(x, where)
        return {"guidance": q, SCALE_KEY: scale}
    magnitude = x.abs().amax(0) if x.shape[0] else x.new_zeros(x.shape[1])
    index = magnitude.topk(k).indices.sort().values
    outliers = x[:, index].to(outlier_dtype).contiguous()
    if has_nonfinite(outliers):
        raise NonFiniteFeatures(f"{where}: an outlier channel overflows {outlier_dtype}")
    rest = x.clone()
    rest[:, index] = 0
    q, scale = quantize_fp8(rest, where)
    return {"guidance": q, SCALE_KEY: scale, OUTLIER_INDEX_KEY: index.to(INDEX_DTYPE), OUTLIER_KEY: outliers}


def dequantize_guidance(tensors: Mapping[str, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    """Float guidance from stored 8-bit tensors, one sample ``[T, D]`` or a batch ``[B, T, D]``."""
    out = dequantize_fp8(tensors["guidance"], tensors[SCALE_KEY], dtype)
    index = tensors.get(OUTLIER_INDEX_KEY)
    if index is not None:
        values = tensors[OUTLIER_KEY].to(dtype)
        out.scatter_(-1, index.long().unsqueeze(-2).expand(values.shape), values)
    return out


def dequantize_batch(batch: Mapping[str, Any], dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A batch with 8-bit guidance -> the same batch with float ``guidance`` and no quantisation
    tensors. A new dict (the input is not modified); 16-bit batches pass through unchanged."""
    if SCALE_KEY not in batch:
        if batch["guidance"].dtype == FP8_DTYPE:
            raise ValueError(f"batch has 8-bit guidance but no {SCALE_KEY}")
        return dict(batch)
    out = {k: v for k, v in batch.items() if k not in QUANT_KEYS}
    out["guidance"] = dequantize_guidance(batch, dtype)
    return out


def to_storage(tensors: Mapping[str, Tensor], dtype: torch.dtype, guidance_dtype: Optional[torch.dtype] = None,
               key: str = "?", outlier_channels: int = DEFAULT_OUTLIER_CHANNELS) -> dict[str, Tensor]:
    """Float features of one sample -> the tensors it stores (``guidance_dtype`` None: ``dtype``).

    Raises :class:`NonFiniteFeatures` naming ``key`` when a value is NaN/Inf, or becomes Inf in a
    16-bit dtype (an activation above 65504 in float16).
    """
    guidance_dtype = guidance_dtype or dtype
    out: dict[str, Tensor] = {}
    for name, value in tensors.items():
        if name == "guidance" and guidance_dtype == FP8_DTYPE:
            out.update(quantize_guidance(value, f"sample {key!r}: guidance", outlier_channels, dtype))
            continue
        target = guidance_dtype if name == "guidance" else dtype
        stored = value.detach().to("cpu", target, copy=True).contiguous()
        if has_nonfinite(stored):
            raise NonFiniteFeatures(f"sample {key!r}: {name} has NaN/Inf values in {target}")
        out[name] = stored
    return out
