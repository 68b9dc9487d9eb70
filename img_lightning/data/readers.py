"""Reader threads that prepare batches ahead of the training loop and hand them over in order.

Why threads and not DataLoader worker processes: a worker's batch must cross into the main process
through shared memory, and every fresh shared-memory segment is page-faulted and zeroed by the kernel
before the first byte lands in it; for the aligner's 6 MB samples that hand-off, not the read, limits
a process-based loader (``benchmarks/loader.py`` measures both). What both stages do per batch
releases the GIL - ``preadv`` into the batch tensors, pyarrow's parquet reads, PIL's decoding, the
Rust tokenizers - so threads in the training process keep up, share one row-group cache or buffer
pool, and leave nothing to copy but the host-to-device transfer.

The queue is bounded (``num_workers x prefetch`` batches in flight) and batches come out in request
order whatever the thread count, which is what exact resume relies on. The time the consumer spends
blocked on a batch is added to :attr:`ReaderPool.wait_seconds` (the Throughput callback's data-wait
share).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, Optional, TypeVar

R = TypeVar("R")  # a request
B = TypeVar("B")  # what reading it gives


class ReaderPool(Generic[R, B]):
    """``num_workers`` threads (0: read inline, on the consumer's thread), ``prefetch`` requests in
    flight per thread. The threads start on the first :meth:`map` and live until :meth:`close`."""

    def __init__(self, num_workers: int = 2, prefetch: int = 2, name: str = "img-data-reader") -> None:
        self.num_workers = max(0, int(num_workers))
        self.prefetch = max(1, int(prefetch))
        self.name = name
        self.wait_seconds = 0.0  # time the consumer spent blocked on data
        self._executor: Optional[ThreadPoolExecutor] = None

    @property
    def in_flight(self) -> int:
        """Most requests being read ahead of the consumer at once."""
        return self.num_workers * self.prefetch

    def map(self, read: Callable[[R], B], requests: Iterable[R]) -> Iterator[B]:
        """``read(request)`` for each request, in request order, read ahead by the threads. Requests
        are drawn from ``requests`` only as the queue has room; leaving the iteration early cancels
        the reads not yet started."""
        if self.num_workers == 0:
            for request in requests:
                start = time.perf_counter()
                batch = read(request)
                self.wait_seconds += time.perf_counter() - start
                yield batch
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix=self.name)
        pending: deque[Future[B]] = deque()
        try:
            for request in requests:
                pending.append(self._executor.submit(read, request))
                if len(pending) >= self.in_flight:
                    yield self._next(pending)
            while pending:
                yield self._next(pending)
        finally:
            for future in pending:
                future.cancel()

    def _next(self, pending: deque[Future[B]]) -> B:
        start = time.perf_counter()
        batch = pending.popleft().result()
        self.wait_seconds += time.perf_counter() - start
        return batch

    def close(self) -> None:
        """Stop the threads (reads not yet started are cancelled, running ones finish)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
