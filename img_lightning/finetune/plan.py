"""The finetune's epoch ordering, plugged into the shared rank plan (:mod:`img_lightning.data.plan`).

The only randomness is one generator per epoch, ``numpy.random.default_rng([seed, epoch, 1])``,
identical on every rank by construction. The order keeps parquet reads local: the row groups are
permuted, cut into windows of ``window`` row groups, and the samples of each window are shuffled
among themselves, so a rank reads each row group of a window once (the windows' row groups fit the
row-group cache) instead of once per sample.

Splitting that order over ranks and steps, dropping the remainder, and the held-out batches padded
with :data:`~img_lightning.data.plan.PAD` are the shared plan's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data.plan import rank_batches


def epoch_order(sample_ids: np.ndarray, group_of: np.ndarray, seed: int, epoch: int, window: int) -> np.ndarray:
    """``sample_ids`` shuffled for ``epoch``: row groups permuted, samples shuffled within windows
    of ``window`` row groups. ``group_of[i]`` is the row group of sample ``i`` (indexed by id)."""
    sample_ids = np.asarray(sample_ids, dtype=np.int64)
    rng = np.random.default_rng([int(seed), int(epoch), 1])
    groups = np.unique(group_of[sample_ids])
    rank_of_group = np.empty(int(groups.max()) + 1 if len(groups) else 0, dtype=np.int64)
    rank_of_group[groups[rng.permutation(len(groups))]] = np.arange(len(groups))
    window_of = rank_of_group[group_of[sample_ids]] // max(1, int(window))
    tiebreak = rng.random(len(sample_ids))
    return sample_ids[np.lexsort((tiebreak, window_of))]


@dataclass(frozen=True, eq=False)
class RowGroupWindows:
    """:func:`epoch_order` as the plan's ordering (``(sample ids, seed, epoch) -> order``)."""

    group_of: np.ndarray
    window: int

    def __call__(self, sample_ids: np.ndarray, seed: int, epoch: int) -> np.ndarray:
        return epoch_order(sample_ids, self.group_of, seed, epoch, self.window)


def train_batches(sample_ids: np.ndarray, group_of: np.ndarray, *, batch_size: int, rank: int, world_size: int,
                  seed: int, epoch: int, window: int) -> list[list[int]]:
    """The training batches of ``rank`` for one epoch, as the DataModule's plan makes them."""
    return [b.tolist() for b in rank_batches(sample_ids, batch_size=batch_size, rank=rank, world_size=world_size,
                                             seed=seed, epoch=epoch, shuffle=True,
                                             order=RowGroupWindows(group_of, window))]


def eval_batches(sample_ids: np.ndarray, *, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """The held-out batches of ``rank``, padded to the same count on every rank."""
    return [b.tolist() for b in rank_batches(sample_ids, batch_size=batch_size, rank=rank, world_size=world_size,
                                             seed=0, epoch=0, shuffle=False, pad=True)]
