"""The finetune's loader: parquet rows turned into token batches by the shared reader threads.

The plan, the reader threads (in order, bounded, data-wait accounting) and the ``(epoch,
position)`` stamps are the shared data stack's (:mod:`img_lightning.data.batch_loader`); a thread's
work here is reading parquet row groups (pyarrow releases the GIL), decoding images (PIL releases
it) and tokenising (Rust tokenizers release it), and the threads share one row-group cache per rank.

A sample that cannot be used - its image does not decode, it is longer than ``data.max_length``,
its text holds an image placeholder - is dropped from its batch and reported in the batch's
``skipped`` list (the DataModule counts and logs them). A batch left with no usable sample holds
one placeholder (no loss), so every rank still runs its step.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import torch

from ..data.batch_loader import BatchLoader
from ..data.plan import PAD, BatchRequest, Plan
from ..encoders.conversation import PromptTextError
from .samples import EncodedSample, OverLong, SampleEncoder
from .triplets import CorruptImage, RowGroupImages, TripletIndex, decode_image


class TripletBatchLoader(BatchLoader):
    def __init__(self, index: TripletIndex, images: RowGroupImages, encoder: SampleEncoder,
                 plan: Plan, *, num_workers: int = 2, prefetch: int = 2) -> None:
        super().__init__(plan, num_workers=num_workers, prefetch=prefetch, thread_name="img-finetune-data")
        self.index = index
        self.images = images
        self.encoder = encoder
        self._placeholder: Optional[EncodedSample] = None
        self._lock = threading.Lock()

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

    def read_batch(self, request: BatchRequest) -> dict[str, Any]:
        samples: list[EncodedSample] = []
        skipped: list[dict[str, str]] = []
        for i in request.indices:
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
        batch["num_real"] = torch.tensor(len(real), dtype=torch.long)
        batch["num_requested"] = torch.tensor(sum(1 for i in request.indices if i != PAD), dtype=torch.long)
        batch["skipped"] = skipped
        return batch
