"""Iteratively Updated Preference Objective (paper eq. 4-7, 18; docs/method.md).

With Gaussian likelihoods of constant variance, ``log p(x | c) = -beta * ||x - f(c)||^2 + const``
(``beta = 1/(2 sigma^2)``), and the paper's DPO + SPIN margin becomes

    A = beta * [ 2(d_w - d_w_ref) - (d_l - d_l_ref) - ||f_ref - f_theta||^2 ]
    L_pref = softplus(A) = log(1 + e^A)

where ``d_w = ||c_w - f_theta(c)||^2`` etc. ``reduction`` decides what ``||.||^2`` means per
sample: ``"sum"`` over the N x D elements is the exact Gaussian log-likelihood (use it to match the
paper's derivation literally); ``"mean"`` divides every distance by N x D, which equals ``"sum"``
with ``beta / (N x D)`` and keeps ``beta ~ 1`` meaningful regardless of the token shape.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

REDUCTIONS = ("mean", "sum")


def batch_mean(x: Tensor, keep: Optional[Tensor] = None) -> Tensor:
    """Mean of the per-sample values ``x`` [B] over the rows where ``keep`` [B] is True (all rows
    when None; 0 when none is kept).

    Accumulated in float64, where the sum of a batch of float32 values is exact, so the result does
    not depend on how the sum is grouped: a batch whose bad samples are masked out (the device-side
    NaN/Inf check, ``data/device_check.py``) gives bit for bit the mean of the batch without them.
    """
    x64 = x.double()
    if keep is None:
        return (x64.sum() / x.shape[0]).to(x.dtype)
    kept = torch.where(keep, x64, torch.zeros((), dtype=torch.float64, device=x.device))
    return (kept.sum() / keep.sum().clamp_min(1)).to(x.dtype)


def squared_distance(a: Tensor, b: Tensor, reduction: str = "mean") -> Tensor:
    """Per-sample ``||a - b||^2`` over all non-batch dims, in float32."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    diff = (a.float() - b.float()).flatten(1)
    sq = diff.pow(2)
    return sq.mean(dim=1) if reduction == "mean" else sq.sum(dim=1)


def preference_objective(
    pred: Tensor,
    ref_pred: Tensor,
    win: Tensor,
    lose: Tensor,
    *,
    lambda_pref: float = 1.0,
    beta: float = 1.0,
    reduction: str = "mean",
    keep: Optional[Tensor] = None,
) -> dict[str, Tensor]:
    """``L = L_base + lambda * L_pref`` for a batch (averaged over the samples where ``keep`` [B]
    is True, when given: the others contribute nothing, not even a gradient).

    Args:
        pred: ``f_theta(c)``, requires grad.
        ref_pred: ``f_ref(c)``, computed without gradient (detached here regardless).
        win: ``c_w``, the winning image's IP features.
        lose: ``c_l``, the losing image's IP features (also the aligner's input).

    Returns a dict of scalars (batch means) ``loss``, ``base``, ``pref``, ``dpo_margin``,
    ``spin_margin``, ``implicit_acc``, ``closer_to_winner``, ``ref_acc`` and per-sample ``dist_win``
    / ``dist_win_ref`` (detached), which the reference-swap rule compares.

    ``implicit_acc`` is Diffusion-DPO's: the share of pairs whose DPO margin is positive (f_theta's
    likelihood ratio over f_ref favours the winner). ``closer_to_winner`` is the share whose output
    is nearer the winner's features than the loser's; since the aligner starts as the identity on
    the loser's features, it stays 0 until outputs move more than halfway to the winners.
    """
    ref_pred = ref_pred.detach()
    d_w = squared_distance(win, pred, reduction)
    d_l = squared_distance(lose, pred, reduction)
    d_w_ref = squared_distance(win, ref_pred, reduction)
    d_l_ref = squared_distance(lose, ref_pred, reduction)
    d_ref = squared_distance(ref_pred, pred, reduction)

    dpo = beta * ((d_w - d_w_ref) - (d_l - d_l_ref))
    spin = beta * ((d_w - d_w_ref) - d_ref)
    a = dpo + spin  # = beta * [2(d_w - d_w_ref) - (d_l - d_l_ref) - d_ref]
    base = batch_mean(d_w, keep)
    pref = batch_mean(F.softplus(a), keep)
    return {
        "loss": base + lambda_pref * pref,
        "base": base,
        "pref": pref,
        # Margins are reported as log-likelihood ratios (positive = f_theta prefers the winner).
        "dpo_margin": batch_mean((-dpo).detach(), keep),
        "spin_margin": batch_mean((-spin).detach(), keep),
        "implicit_acc": batch_mean((dpo < 0).float(), keep).detach(),
        "closer_to_winner": batch_mean((d_w < d_l).float(), keep).detach(),
        "ref_acc": batch_mean((d_w < d_w_ref).float(), keep).detach(),
        "dist_win": d_w.detach(),
        "dist_win_ref": d_w_ref.detach(),
    }
