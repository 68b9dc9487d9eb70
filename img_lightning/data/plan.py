"""Which samples each rank reads in which order: a pure function of (seed, epoch, rank, world).

One plan serves both training stages; only the epoch's *ordering* is plugged in:

* the aligner (:func:`shuffled`): one permutation of the sample ids per epoch, drawn from
  ``numpy.random.default_rng([seed, epoch])``;
* the MLLM finetune (``finetune/plan.py``): parquet row groups permuted and samples shuffled within
  windows of row groups, so a rank reads each row group of a window once.

An ordering depends only on ``(sample ids, seed, epoch)``: it is identical on every rank by
construction (no dependence on process-global RNG state, which ``seed_everything`` makes equal across
ranks), and the reader threads hold no RNG at all: they read whatever requests the plan hands them,
in order. That is what makes rank balance and exact mid-epoch resume hold.

Training: global step ``j`` reads the contiguous block ``[j*W*B, (j+1)*W*B)`` of the epoch's order and
rank ``r`` its ``r``-th slice; the remainder that does not fill ``W`` whole batches is dropped, so every
rank has the same number of batches (unequal counts hang DDP and FSDP). Evaluation: every sample once,
strided over ranks, last batch partial; with ``pad`` each rank's share is filled up with :data:`PAD`
(a placeholder sample that runs the forward and contributes no loss) so that all ranks run the same
number of forward passes - FSDP gathers parameters inside the forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple, Protocol

import numpy as np

PAD = -1  # a placeholder sample (evaluation padding): runs the forward, contributes no loss

# (sample ids, seed, epoch) -> the same ids in this epoch's training order
Ordering = Callable[[np.ndarray, int, int], np.ndarray]


class BatchRequest(NamedTuple):
    """What the plan hands a reader thread: the samples, plus where this batch sits in the run."""

    indices: list[int]  # sample ids (PAD for a placeholder)
    epoch: int
    position: int  # 0-based index of this batch within the rank's epoch


class Plan(Protocol):
    """What a loader reads: the requests of one pass, in order, and how many there are (a
    :class:`RankPlan`, or a list of requests)."""

    def __iter__(self) -> Iterator[BatchRequest]: ...

    def __len__(self) -> int: ...


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_samples)


def shuffled(sample_ids: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The aligner's ordering: one permutation of the ids per ``(seed, epoch)``."""
    return sample_ids[epoch_permutation(len(sample_ids), seed, epoch)]


def train_split(order: np.ndarray, *, batch_size: int, rank: int, world_size: int) -> list[np.ndarray]:
    """Rank ``rank``'s training batches of one epoch's ``order`` (same count on every rank)."""
    per_step = batch_size * world_size
    steps = len(order) // per_step
    blocks = order[: steps * per_step].reshape(steps, world_size, batch_size)
    return list(blocks[:, rank, :])


def eval_split(sample_ids: np.ndarray, *, batch_size: int, rank: int, world_size: int,
               pad: bool = False) -> list[np.ndarray]:
    """Every sample once, strided over ranks; with ``pad`` each rank's share is filled up with
    :data:`PAD` to the same length (so every rank has the same batches, of the same sizes)."""
    mine = sample_ids[rank::world_size]
    if pad:
        per_rank = -(-len(sample_ids) // world_size)
        mine = np.concatenate([mine, np.full(per_rank - len(mine), PAD, dtype=mine.dtype)])
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def rank_batches(sample_ids: np.ndarray, *, batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
                 shuffle: bool, order: Ordering = shuffled, pad: bool = False) -> list[np.ndarray]:
    """The batches of ``rank`` for one epoch: training (``shuffle``) in ``order``'s order, else the
    evaluation split (see the module doc)."""
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad batch_size/rank/world_size: {batch_size}/{rank}/{world_size}")
    sample_ids = np.asarray(sample_ids, dtype=np.int64)
    if shuffle:
        return train_split(order(sample_ids, seed, epoch), batch_size=batch_size, rank=rank, world_size=world_size)
    return eval_split(sample_ids, batch_size=batch_size, rank=rank, world_size=world_size, pad=pad)


class RankPlan:
    """Yields the rank's :class:`BatchRequest` s of one pass, starting where ``start_fn`` says.

    ``start_fn`` is called each time iteration begins and returns ``(epoch, first_batch)``; the
    DataModule derives it from the checkpointed position of the last batch trained on, so the plan
    needs no ``set_epoch`` (which Lightning does not call reliably after a resume). ``rank`` and
    ``world_size`` are read when iteration begins.
    """

    def __init__(self, sample_ids: np.ndarray, *, batch_size: int, rank: int, world_size: int, seed: int = 0,
                 shuffle: bool = True, order: Ordering = shuffled, pad: bool = False,
                 start_fn: Callable[[], tuple[int, int]] = lambda: (0, 0)) -> None:
        self.sample_ids = np.asarray(sample_ids, dtype=np.int64)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.order = order
        self.pad = pad
        self.start_fn = start_fn

    def batches(self, epoch: int) -> list[np.ndarray]:
        return rank_batches(self.sample_ids, batch_size=self.batch_size, rank=self.rank,
                            world_size=self.world_size, seed=self.seed, epoch=epoch, shuffle=self.shuffle,
                            order=self.order, pad=self.pad)

    def __iter__(self) -> Iterator[BatchRequest]:
        epoch, start = self.start_fn()
        for position, batch in enumerate(self.batches(epoch)):
            if position >= start:
                yield BatchRequest(batch.tolist(), epoch, position)

    def __len__(self) -> int:
        n = len(self.sample_ids)
        if self.shuffle:
            return n // (self.batch_size * self.world_size)
        mine = -(-n // self.world_size) if self.pad else len(range(self.rank, n, self.world_size))
        return -(-mine // self.batch_size)
