"""NaN/Inf detection on the stored bits, cheap enough to run on every sample the loader reads.

A float is non-finite exactly when its exponent bits are all ones (float8_e4m3fn has no infinity;
its only non-finite code is NaN, exponent and mantissa all ones). Read as a signed integer, a
positive non-finite value is at least ``pos``; read as an unsigned integer, a negative one is at
least ``neg``. So two ``max`` reductions over integer views answer the question with no temporary
array and no float conversion (``torch.isfinite`` on CPU makes a full-size bool tensor and does
not support float8 at all). What it costs the loader: ``benchmarks/loader.py``, line (d).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# dtype -> (signed view, unsigned numpy view, positive threshold, negative threshold (unsigned))
_BITS = {
    torch.float16: (torch.int16, np.uint16, 0x7C00, 0xFC00),
    torch.bfloat16: (torch.int16, np.uint16, 0x7F80, 0xFF80),
    torch.float32: (torch.int32, np.uint32, 0x7F800000, 0xFF800000),
    torch.float8_e4m3fn: (torch.int8, np.uint8, 0x7F, 0xFF),
}


def has_nonfinite(t: Tensor) -> bool:
    """True if any element of the CPU tensor ``t`` is NaN or +-Inf."""
    if t.numel() == 0:
        return False
    bits = _BITS.get(t.dtype)
    if bits is None:
        if not t.is_floating_point():
            return False
        return not bool(torch.isfinite(t).all())
    signed, unsigned, pos, neg = bits
    values = t.view(signed).numpy()
    return bool(values.max() >= pos) or bool(values.view(unsigned).max() >= neg)


def scales_ok(scale: Tensor) -> bool:
    """Per-token scales of 8-bit guidance must be finite and > 0 (the writer never stores 0)."""
    s = scale.numpy()
    return bool(np.isfinite(s).all()) and bool((s > 0).all())
