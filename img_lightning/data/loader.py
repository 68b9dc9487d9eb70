"""The aligner's loader: feature-cache records read by the reader threads straight into batch tensors.

A sample is raw tensor bytes at a known offset, so a read is one ``preadv`` into the rows of the
padded batch (:class:`~img_lightning.cache.reader.BatchReader`): no decode, and with threads (see
:mod:`.readers`) no hand-off between processes. Batch memory is recycled through a
:class:`~img_lightning.cache.reader.BufferPool`, or pinned when a GPU will consume it, leaving
nothing to copy but the host-to-device transfer.
"""

from __future__ import annotations

import threading
from typing import Any

from ..cache.reader import BatchReader, BufferPool, CacheView
from .batch_loader import BatchLoader
from .plan import BatchRequest, Plan


class ThreadedBatchLoader(BatchLoader):
    """Iterable of batch dicts for one rank. ``num_workers`` reader threads (0 = read inline),
    ``prefetch`` batches in flight per thread; ``check_finite=False`` leaves the per-sample NaN/Inf
    check to the consumer's device."""

    def __init__(
        self,
        view: CacheView,
        plan: Plan,
        *,
        num_workers: int = 2,
        prefetch: int = 2,
        pin_memory: bool = False,
        max_open_shards: int = 64,
        check_finite: bool = True,
    ) -> None:
        super().__init__(plan, num_workers=num_workers, prefetch=prefetch, thread_name="img-cache-reader")
        self.view = view
        self.pin_memory = pin_memory
        self.check_finite = check_finite  # False: the NaN/Inf check runs on the device (data/device_check.py)
        self.max_open_shards = max_open_shards
        self._local = threading.local()
        # Enough recycled batches for those in flight plus the few the consumer holds.
        self._pool = BufferPool(max_buffers=max(1, self.readers.num_workers) * self.readers.prefetch + 4)

    def _reader(self) -> BatchReader:
        # One reader (and set of open files) per thread: no locking on the hot path.
        reader = getattr(self._local, "reader", None)
        if reader is None:
            reader = self._local.reader = BatchReader(self.view, max_open=self.max_open_shards, pool=self._pool)
        return reader

    def read_batch(self, request: BatchRequest) -> dict[str, Any]:
        return self._reader().read(request.indices, pin_memory=self.pin_memory, check_finite=self.check_finite)
