"""Which samples each rank trains on, in which order: a pure function of (seed, epoch, rank, world).

The only randomness is one generator per epoch, ``numpy.random.default_rng([seed, epoch, 1])``,
identical on every rank by construction. The epoch order keeps parquet reads local: the row groups
are permuted, cut into windows of ``window`` row groups, and the samples of each window are
shuffled among themselves, so a rank reads each row group of a window once (the windows' row
groups fit the row-group cache) instead of once per sample.

Global step ``j`` takes the contiguous block ``[j*W*B, (j+1)*W*B)`` of that order and rank ``r``
its ``r``-th slice; the remainder that does not fill a whole global step is dropped, so every rank
has the same number of batches (unequal counts hang DDP and FSDP). Held-out batches: every sample
once, strided over ranks, and padded with :data:`PAD` (a placeholder sample with no loss) so that
all ranks run the same number of forward passes - FSDP gathers parameters inside the forward.
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

import numpy as np

PAD = -1  # a placeholder sample: runs the forward, contributes no loss


class BatchRequest(NamedTuple):
    ids: list[int]  # sample ids (PAD for a placeholder)
    epoch: int
    position: int  # 0-based index of this batch within the rank's epoch


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


def train_batches(sample_ids: np.ndarray, group_of: np.ndarray, *, batch_size: int, rank: int, world_size: int,
                  seed: int, epoch: int, window: int) -> list[list[int]]:
    """The training batches of ``rank`` for one epoch (same count on every rank)."""
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad batch_size/rank/world_size: {batch_size}/{rank}/{world_size}")
    order = epoch_order(sample_ids, group_of, seed, epoch, window)
    per_step = batch_size * world_size
    steps = len(order) // per_step
    blocks = order[: steps * per_step].reshape(steps, world_size, batch_size)
    return [b.tolist() for b in blocks[:, rank, :]]


def eval_batches(sample_ids: np.ndarray, *, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """Every sample once, strided over ranks; each rank's share padded with :data:`PAD` to the same
    length, so all ranks have the same number of batches (of the same sizes)."""
    sample_ids = np.asarray(sample_ids, dtype=np.int64)
    per_rank = -(-len(sample_ids) // world_size)
    mine = sample_ids[rank::world_size].tolist()
    mine += [PAD] * (per_rank - len(mine))
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


class TrainPlan:
    """Yields the rank's batches of one pass, starting where ``start_fn`` says (``(epoch, first
    batch)``, derived by the DataModule from the checkpointed position: Lightning does not call
    ``set_epoch`` reliably after a mid-epoch resume)."""

    def __init__(self, sample_ids: np.ndarray, group_of: np.ndarray, *, batch_size: int, rank: int,
                 world_size: int, seed: int, window: int,
                 start_fn: Callable[[], tuple[int, int]] = lambda: (0, 0)) -> None:
        self.sample_ids = np.asarray(sample_ids, dtype=np.int64)
        self.group_of = group_of
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.window = seed, window
        self.start_fn = start_fn

    def batches(self, epoch: int) -> list[list[int]]:
        return train_batches(self.sample_ids, self.group_of, batch_size=self.batch_size, rank=self.rank,
                             world_size=self.world_size, seed=self.seed, epoch=epoch, window=self.window)

    def __iter__(self) -> Iterator[BatchRequest]:
        epoch, start = self.start_fn()
        for position, ids in enumerate(self.batches(epoch)):
            if position >= start:
                yield BatchRequest(ids, epoch, position)

    def __len__(self) -> int:
        return len(self.sample_ids) // (self.batch_size * self.world_size)


class EvalPlan:
    def __init__(self, sample_ids: np.ndarray, *, batch_size: int, rank: int, world_size: int) -> None:
        self._batches = eval_batches(sample_ids, batch_size=batch_size, rank=rank, world_size=world_size)

    def __iter__(self) -> Iterator[BatchRequest]:
        for position, ids in enumerate(self._batches):
            yield BatchRequest(ids, 0, position)

    def __len__(self) -> int:
        return len(self._batches)
