"""The per-sample NaN/Inf check on the device, after the host-to-device copy.

On the reader thread the check reads every sample twice more at one core's memory speed and costs
~30 % of what that thread delivers (``benchmarks/loader.py``, line (d)). On a GPU the same question
is one ``isfinite`` reduction per tensor over the whole batch, microseconds next to the step. So
when training on a GPU (``data.finite_check: auto`` or ``device``) the reader skips it and this
module answers it right after the copy, without a host-device synchronisation:

* :func:`check_batch` computes which samples hold NaN/Inf (or, with 8-bit guidance, a scale that is
  not finite and positive on a real token), zeroes those rows so no NaN reaches the aligner, and
  adds ``sample_ok`` [B] (bool): the objective averages over the ``True`` rows only, so a batch
  with masked samples trains exactly as the batch without them;
* :class:`PendingChecks` keeps the per-sample verdicts on the device until the caller reads them
  back (after the step, when the stream is idle anyway) to count and name the bad samples, the
  same counters and log lines as the reader's check.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..cache.format import SCALE_KEY
from ..cache.quant import dequantize_batch

# The tensors checked, in the order of the columns of ``check_batch``'s verdicts.
CHECKED = ("guidance", "ip_lose", "ip_win", SCALE_KEY)


def _rows_finite(t: Tensor) -> Tensor:
    """[B] bool: every value of row ``b`` is finite."""
    return torch.isfinite(t).flatten(1).all(1)


def check_batch(batch: Mapping[str, Any]) -> tuple[dict[str, Any], Tensor]:
    """The batch with 8-bit guidance widened, bad rows zeroed and ``sample_ok`` added, and the
    per-tensor verdicts ``[B, len(CHECKED)]`` (True = fine) for :class:`PendingChecks`.

    8-bit guidance is checked after widening (``q * scale`` is NaN/Inf when the code, the scale or
    an outlier channel is), plus its scales on real tokens: a zero or negative scale gives finite but
    wrong values. Padding is zero in every batch the reader builds, so it never trips the check.
    """
    scale = batch.get(SCALE_KEY)
    if scale is not None:
        scale_ok = ((scale > 0) & torch.isfinite(scale)) | ~batch["guidance_mask"]
        scale_ok = scale_ok.all(1)
    out = dequantize_batch(batch)
    verdicts = [_rows_finite(out[name]) for name in CHECKED[:3]]
    verdicts.append(scale_ok if scale is not None else torch.ones_like(verdicts[0]))
    verdicts_t = torch.stack(verdicts, dim=1)
    ok = verdicts_t.all(1)
    for name in CHECKED[:3]:  # in place: these are this batch's own device copies
        t = out[name]
        t.masked_fill_(~ok.view(-1, *([1] * (t.dim() - 1))), 0)
    out["sample_ok"] = ok
    return out, verdicts_t


def bad_samples(verdicts: Tensor, index: Tensor) -> list[tuple[int, list[str]]]:
    """``(sample index, names of its bad tensors)`` for each bad row of one batch's verdicts (reads
    them back to the host: a synchronisation)."""
    bad = []
    for row, i in zip(verdicts.cpu().tolist(), index.cpu().tolist(), strict=True):
        names = [name for name, fine in zip(CHECKED, row, strict=True) if not fine]
        if names:
            bad.append((int(i), names))
    return bad


class PendingChecks:
    """Device-side verdicts of training batches not yet read back (read them with :meth:`settle`)."""

    def __init__(self) -> None:
        self._items: list[tuple[Tensor, Tensor]] = []

    def add(self, verdicts: Tensor, index: Tensor) -> None:
        self._items.append((verdicts, index))

    def settle(self) -> list[tuple[int, list[str]]]:
        """:func:`bad_samples` of every batch added since the last call; call it where the device is
        synchronised anyway (after a step), so reading the verdicts back costs no wait."""
        bad = [b for verdicts, index in self._items for b in bad_samples(verdicts, index)]
        self._items.clear()
        return bad
