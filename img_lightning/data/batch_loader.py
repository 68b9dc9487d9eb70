"""One rank's loader: the plan's requests, read by the reader threads, stamped with their place in the run.

Both stages' loaders are this class with :meth:`BatchLoader.read_batch` filled in (a feature-cache
record read into recycled buffers, or parquet rows turned into tokens). Every batch carries
``epoch`` and ``position`` (0-d long tensors): the DataModule records them for the batch about to be
trained on, which is the whole of exact resume (see :mod:`.resumable`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch

from .plan import BatchRequest, Plan
from .readers import ReaderPool


class BatchLoader(ABC):
    """Iterable of one rank's batch dicts, in plan order. ``plan``: the requests of one pass."""

    def __init__(self, plan: Plan, *, num_workers: int = 2, prefetch: int = 2,
                 thread_name: str = "img-data-reader") -> None:
        self.plan = plan
        self.readers: ReaderPool[BatchRequest, dict[str, Any]] = ReaderPool(num_workers, prefetch, thread_name)

    @property
    def batch_sampler(self) -> Plan:
        """The plan, under the name torch's DataLoader gives what yields a batch's indices (Lightning
        looks for a ``set_epoch`` there; the plan has none on purpose: see :class:`~.plan.RankPlan`)."""
        return self.plan

    @property
    def num_workers(self) -> int:
        return self.readers.num_workers

    @property
    def wait_seconds(self) -> float:
        """Time the consumer spent blocked on data (read by the Throughput callback)."""
        return self.readers.wait_seconds

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # iter(plan) here, when iteration begins: that is when the plan asks where to start
        return self.readers.map(self._read, iter(self.plan))

    def _read(self, request: BatchRequest) -> dict[str, Any]:
        batch = self.read_batch(request)
        batch["epoch"] = torch.tensor(request.epoch, dtype=torch.long)
        batch["position"] = torch.tensor(request.position, dtype=torch.long)
        return batch

    @abstractmethod
    def read_batch(self, request: BatchRequest) -> dict[str, Any]:
        """The batch of ``request.indices`` (runs on a reader thread)."""

    def close(self) -> None:
        self.readers.close()
