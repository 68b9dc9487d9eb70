"""Batches of encoded edit triplets, prepared by threads ahead of the training loop.

Threads, not DataLoader processes: the work is reading parquet row groups (pyarrow releases the
GIL), decoding images (PIL releases it) and tokenising (Rust tokenizers release it), and threads
share one row-group cache per rank. Batches come out in plan order whatever the thread count,
which is what exact resume relies on.

A sample that cannot be used - its image does not decode, it is longer than ``data.max_length``,
its text holds an image placeholder - is dropped from its batch and reported in the batch's
``skipped`` list (the DataModule counts and logs them). A batch left with no usable sample holds
one placeholder (no loss), so every rank still runs its step.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator, Optional

import torch

from ..encoders.conversation import PromptTextError
from .plan import PAD, BatchRequest
from .samples import EncodedSample, OverLong, SampleEncoder
from .triplets import CorruptImage, RowGroupImages, TripletIndex, decode_image


class TripletBatchLoader:
    def __init__(self, index: TripletIndex, images: RowGroupImages, encoder: SampleEncoder,
                 plan: Iterable[BatchRequest], *, num_workers: int = 2, prefetch: int = 2) -> None:
        self.index = index
        self.images = images
        self.encoder = encoder
        self.plan = plan
        self.num_workers = max(0, int(num_workers))
        self.prefetch = max(1, int(prefetch))
        self.wait_seconds = 0.0  # time the consumer was blocked on data (Throughput callback)
        self._placeholder: Optional[EncodedSample] = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.plan)  # type: ignore[arg-type]

    def placeholder(self) -> EncodedSample:
        with self._lock:
            if self._placeholder is None:
                self._placeholder = self.encoder.placeholder()
            return self._placeholder

    def sample(self, i: int) -> EncodedSample:
        """Sample ``i`` of the index, encoded; raises CorruptImage, OverLong or PromptTextError."""
        fi, rg, row = self.index.location(i)
        image = decode_image(self.images.image_bytes(fi, rg, row))
        return self.encoder.encode(self.index.keys[i], image, self.index.edited_prompt[i], self.index.instruction[i])

    def make_batch(self, request: BatchRequest) -> dict[str, Any]:
        samples: list[EncodedSample] = []
        skipped: list[dict[str, str]] = []
        for i in request.ids:
            if i == PAD:
                samples.append(self.placeholder())
                continue
            try:
                samples.append(self.sample(i))
            except CorruptImage as err:
                skipped.append({"key": self.index.keys[i], "reason": "corrupt_image", "detail": str(err)})
            except OverLong as err:
                skipped.append({"key": self.index.keys[i], "reason": "over_long", "detail": str(err)})
            except PromptTextError as err:
                skipped.append({"key": self.index.keys[i], "reason": "placeholder_in_text", "detail": str(err)})
        real = [s for s in samples if s.key]
        if not samples:
            samples = [self.placeholder()]
        batch = self.encoder.collate(samples)
        batch["keys"] = [s.key for s in samples]
        batch["question_index"] = torch.tensor([s.question_index for s in samples], dtype=torch.long)
        batch["epoch"] = torch.tensor(request.epoch, dtype=torch.long)
        batch["position"] = torch.tensor(request.position, dtype=torch.long)
        batch["num_real"] = torch.tensor(len(real), dtype=torch.long)
        batch["num_requested"] = torch.tensor(sum(1 for i in request.ids if i != PAD), dtype=torch.long)
        batch["skipped"] = skipped
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        requests = iter(self.plan)  # the plan's start_fn runs here, when iteration begins
        if self.num_workers == 0:
            for request in requests:
                start = time.perf_counter()
                batch = self.make_batch(request)
                self.wait_seconds += time.perf_counter() - start
                yield batch
            return
        executor = ThreadPoolExecutor(max_workers=self.num_workers, thread_name_prefix="img-finetune-data")
        pending: deque = deque()
        try:
            for request in requests:
                pending.append(executor.submit(self.make_batch, request))
                if len(pending) < self.num_workers * self.prefetch:
                    continue
                yield self._next(pending)
            while pending:
                yield self._next(pending)
        finally:
            executor.shutdown(wait=False, cancel_futures=True)

    def _next(self, pending: deque) -> dict[str, Any]:
        future = pending.popleft()
        start = time.perf_counter()
        batch = future.result()
        self.wait_seconds += time.perf_counter() - start
        return batch
