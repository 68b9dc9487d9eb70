"""The training/validation loader: reader *threads* that fill batches ahead of the consumer.

Why threads and not DataLoader worker processes: a worker's batch must cross into the main process
through shared memory, and every fresh shared-memory segment is page-faulted and zeroed by the
kernel before the first byte lands in it; for 6 MB samples that hand-off, not the read, is what
limits a process-based loader (benchmarks/loader.py measures both ends). Reading is a ``preadv``
syscall that releases the GIL, decoding is nothing (the bytes are the tensor), so threads in the
training process read at page-cache speed straight into the batch tensors, pinned when a GPU will
consume them, with nothing left to copy but the host-to-device transfer.

Order is deterministic: batches come out in sampler order whatever the thread count, which is what
exact resume relies on.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator, Optional

from ..cache.reader import BatchReader, BufferPool, CacheView
from .plan import BatchRequest, ResumableBatchSampler


class ThreadedBatchLoader:
    """Iterable of batch dicts for one rank. ``num_workers`` reader threads (0 = read inline),
    ``prefetch`` batches in flight per thread; ``check_finite=False`` leaves the per-sample NaN/Inf
    check to the consumer's device."""

    def __init__(
        self,
        view: CacheView,
        batch_sampler: ResumableBatchSampler,
        *,
        num_workers: int = 2,
        prefetch: int = 2,
        pin_memory: bool = False,
        max_open_shards: int = 64,
        check_finite: bool = True,
    ) -> None:
        self.view = view
        self.batch_sampler = batch_sampler
        self.num_workers = max(0, num_workers)
        self.prefetch = max(1, prefetch)
        self.pin_memory = pin_memory
        self.check_finite = check_finite  # False: the NaN/Inf check runs on the device (data/device_check.py)
        self.max_open_shards = max_open_shards
        self._local = threading.local()
        self._executor: Optional[ThreadPoolExecutor] = None
        self.wait_seconds = 0.0  # time the consumer spent blocked on data (read by the Throughput callback)
        # Enough recycled batches for those in flight plus the few the consumer holds.
        self._pool = BufferPool(max_buffers=max(1, self.num_workers) * self.prefetch + 4)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def _reader(self) -> BatchReader:
        # One reader (and set of open files) per thread: no locking on the hot path.
        reader = getattr(self._local, "reader", None)
        if reader is None:
            reader = self._local.reader = BatchReader(self.view, max_open=self.max_open_shards, pool=self._pool)
        return reader

    def _read(self, request: BatchRequest) -> dict[str, Any]:
        import torch

        batch = self._reader().read(request.indices, pin_memory=self.pin_memory, check_finite=self.check_finite)
        batch["epoch"] = torch.tensor(request.epoch, dtype=torch.long)
        batch["position"] = torch.tensor(request.position, dtype=torch.long)
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        requests = iter(self.batch_sampler)  # start_fn runs here, when iteration begins
        if self.num_workers == 0:
            for request in requests:
                start = time.perf_counter()
                batch = self._read(request)
                self.wait_seconds += time.perf_counter() - start
                yield batch
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix="img-cache-reader")
        pending: deque[Future] = deque()
        try:
            for request in requests:
                pending.append(self._executor.submit(self._read, request))
                if len(pending) >= self.num_workers * self.prefetch:
                    yield self._next_ready(pending)
            while pending:
                yield self._next_ready(pending)
        finally:
            for future in pending:
                future.cancel()

    def _next_ready(self, pending: deque) -> dict[str, Any]:
        start = time.perf_counter()
        batch = pending.popleft().result()
        self.wait_seconds += time.perf_counter() - start
        return batch

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
