"""Which samples each rank reads in which order: a pure function of (seed, epoch, rank, world).

There is exactly one source of randomness, the epoch permutation, drawn from
``numpy.random.default_rng([seed, epoch])``. It is identical on every rank by construction (no
dependence on process-global RNG state, which ``seed_everything`` makes equal across ranks and
workers), and loader workers hold no RNG at all: they read whatever indices the main process hands
them, in order. That is what makes rank balance, per-worker disjointness and exact mid-epoch resume
hold without any per-worker seeding.
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

import numpy as np
from torch.utils.data import Sampler


class BatchRequest(NamedTuple):
    """What the sampler hands a loader worker: the samples, plus where this batch sits in the run."""

    indices: list[int]
    epoch: int
    position: int  # 0-based index of this batch within the rank's epoch


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_samples)


def rank_batches(
    sample_ids: np.ndarray, *, batch_size: int, rank: int, world_size: int, seed: int, epoch: int, shuffle: bool
) -> list[np.ndarray]:
    """The batches of ``rank`` for one epoch.

    Training (``shuffle``): permute, drop the remainder that does not fill ``world_size`` whole
    batches, so every rank gets the same number of batches (unequal counts hang DDP); global step
    ``j`` reads the contiguous block ``[j*W*B, (j+1)*W*B)`` of the permutation, rank ``r`` its
    ``r``-th slice. Evaluation (no shuffle): every sample once, strided over ranks, last batch
    partial (counts may differ by one; metrics are reduced with sample counts, not batch counts).
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad batch_size/rank/world_size: {batch_size}/{rank}/{world_size}")
    if shuffle:
        order = sample_ids[epoch_permutation(len(sample_ids), seed, epoch)]
        per_step = batch_size * world_size
        steps = len(order) // per_step
        blocks = order[: steps * per_step].reshape(steps, world_size, batch_size)
        return list(blocks[:, rank, :])
    mine = sample_ids[rank::world_size]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


class ResumableBatchSampler(Sampler[BatchRequest]):
    """Yields the rank's batches of one pass, starting where ``start_fn`` says.

    ``start_fn`` is called each time iteration begins and returns ``(epoch, first_batch)``; the
    DataModule derives it from the checkpointed position of the last batch trained on, so the
    sampler needs no ``set_epoch`` (which Lightning does not call reliably after a resume).
    """

    def __init__(
        self,
        sample_ids: np.ndarray,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool,
        start_fn: Callable[[], tuple[int, int]] = lambda: (0, 0),
    ) -> None:
        self.sample_ids = np.asarray(sample_ids, dtype=np.int64)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.start_fn = start_fn

    def batches(self, epoch: int) -> list[np.ndarray]:
        return rank_batches(
            self.sample_ids,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            epoch=epoch,
            shuffle=self.shuffle,
        )

    def __iter__(self) -> Iterator[BatchRequest]:
        epoch, start = self.start_fn()
        for position, batch in enumerate(self.batches(epoch)):
            if position >= start:
                yield BatchRequest(batch.tolist(), epoch, position)

    def __len__(self) -> int:
        n = len(self.sample_ids)
        if self.shuffle:
            return n // (self.batch_size * self.world_size)
        mine = len(range(self.rank, n, self.world_size))
        return -(-mine // self.batch_size)
