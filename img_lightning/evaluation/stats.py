"""Statistics of a paired comparison: means, win rates with ties apart, seeded bootstrap intervals.

Win rate of A over B = share of prompts (same seed) where score(A) > score(B). Ties are
counted separately rather than split, because a metric like the T2I-CompBench spatial score is 0
for many images and would otherwise hide how often the two arms are indistinguishable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class PairedComparison:
    """A vs B on the same prompts: win / tie / loss shares, mean difference, each with a 95% CI."""

    n: int
    win: Interval
    tie: Interval
    loss: Interval
    mean_diff: Interval

    def to_dict(self) -> dict:
        return {"n": self.n, **{k: getattr(self, k).to_dict() for k in ("win", "tie", "loss", "mean_diff")}}


def _as_array(x: Sequence[float]) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"expected a 1-D sequence of scores, got shape {a.shape}")
    return a


def bootstrap_indices(n: int, num_resamples: int, seed: int) -> np.ndarray:
    """``[num_resamples, n]`` indices drawn with replacement; the same seed gives the same draws."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(num_resamples, n))


def _interval(values: np.ndarray, point: float, alpha: float) -> Interval:
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return Interval(float(point), float(low), float(high))


def mean_ci(x: Sequence[float], num_resamples: int = 1000, seed: int = 0, alpha: float = 0.05) -> Interval:
    """Mean with a percentile-bootstrap (1 - alpha) interval over prompts."""
    a = _as_array(x)
    if a.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    idx = bootstrap_indices(a.size, num_resamples, seed)
    return _interval(a[idx].mean(axis=1), float(a.mean()), alpha)


def paired_comparison(
    a: Sequence[float],
    b: Sequence[float],
    num_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    tie_tolerance: float = 0.0,
) -> PairedComparison:
    """Compare arm A to arm B prompt by prompt.

    A pair is a tie when ``|a - b| <= tie_tolerance`` (exact equality by default). The intervals
    resample prompts (the same resampled index set for all four statistics).
    """
    a_, b_ = _as_array(a), _as_array(b)
    if a_.shape != b_.shape:
        raise ValueError(f"paired scores must have the same length, got {a_.size} and {b_.size}")
    n = a_.size
    if n == 0:
        nan = Interval(float("nan"), float("nan"), float("nan"))
        return PairedComparison(0, nan, nan, nan, nan)
    diff = a_ - b_
    tie = np.abs(diff) <= tie_tolerance
    win = (diff > 0) & ~tie
    loss = (diff < 0) & ~tie
    idx = bootstrap_indices(n, num_resamples, seed)
    return PairedComparison(
        n=n,
        win=_interval(win[idx].mean(axis=1), float(win.mean()), alpha),
        tie=_interval(tie[idx].mean(axis=1), float(tie.mean()), alpha),
        loss=_interval(loss[idx].mean(axis=1), float(loss.mean()), alpha),
        mean_diff=_interval(diff[idx].mean(axis=1), float(diff.mean()), alpha),
    )
