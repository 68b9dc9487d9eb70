"""Map-style dataset over a cache view whose items are whole batches (``__getitems__``)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.utils.data import Dataset

from ..cache.reader import BatchReader, CacheView
from .plan import BatchRequest


class CacheBatchDataset(Dataset):
    """``__getitems__(BatchRequest)`` returns a collated, padded batch read by :class:`BatchReader`.

    Batching inside the worker lets the reader allocate the padded batch once and read every
    tensor straight into it; the DataLoader's ``collate_fn`` is then the identity.
    """

    def __init__(self, view: CacheView, max_open_shards: int = 64) -> None:
        self.view = view
        self.max_open_shards = max_open_shards
        self._reader: Optional[BatchReader] = None
        self._reader_pid: Optional[int] = None

    def __len__(self) -> int:
        return self.view.num_samples

    def _get_reader(self) -> BatchReader:
        import os

        # File descriptors must not be shared across fork: one reader per process.
        if self._reader is None or self._reader_pid != os.getpid():
            self._reader = BatchReader(self.view, max_open=self.max_open_shards)
            self._reader_pid = os.getpid()
        return self._reader

    def __getitems__(self, request: BatchRequest) -> dict[str, Any]:
        batch = self._get_reader().read(request.indices)
        batch["epoch"] = torch.tensor(request.epoch, dtype=torch.long)
        batch["position"] = torch.tensor(request.position, dtype=torch.long)
        return batch

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._get_reader().read([index], shared=False)


def passthrough_collate(batch: dict[str, Any]) -> dict[str, Any]:
    """The dataset already collated the batch."""
    return batch
