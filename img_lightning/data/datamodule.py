"""The aligner's DataModule: cache checks, the rank plan over the cache's samples, the bad-sample rules.

Rank plans, exact resume and rank/world come from :class:`~.resumable.ResumableDataModule` (shared
with the MLLM finetune); what is particular here is what a sample is, a feature-cache record.

8-bit guidance travels to the device as stored (float8 + per-token scales) and is widened to float32
in :meth:`on_after_batch_transfer`, on the device, so the loader and the host-to-device copy move
half the bytes.

The per-sample NaN/Inf check runs where it is cheap (``data.finite_check``): on the reader thread
for CPU training (bad samples dropped from their batch), on the device after the copy when training
on a GPU (:mod:`.device_check`: bad samples masked out of the loss). Either way they are named in the
log and counted: each rank notes the samples its training batches read and found bad, and at every
optimizer step the ranks add up their notes (:mod:`.step_counts`), so ``samples_read`` and
``bad_samples`` (checkpointed) are totals over all ranks and the ``data.max_bad_fraction`` rule
decides the same on every rank. The device's verdicts are read back at that step, where the step
waits for the device anyway (the reference-swap decision reads its distances back at every step,
the gradient's finite check too outside ``16-mixed``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from ..cache.quant import dequantize_batch
from ..cache.reader import BadSampleLog, CacheView, nonfinite_error
from ..config.train import DataConfig
from ..errors import UserError
from .device_check import PendingChecks, bad_samples, check_batch
from .loader import ThreadedBatchLoader
from .plan import RankPlan
from .resumable import AllSum, ResumableDataModule
from .step_counts import bad_share_bound

log = logging.getLogger(__name__)


class DamagedCacheError(UserError, RuntimeError):
    """More of a cache is unreadable or non-finite than ``data.max_bad_fraction`` allows."""


class CacheMismatchError(UserError, ValueError):
    """The cache was made by a different recipe, or its shapes do not fit the model."""


@dataclass(frozen=True)
class ExpectedFeatures:
    """What the model needs from the cache."""

    cache_key: Optional[str]  # None: accept any key (only for tests and ad-hoc use)
    guidance_dim: int
    ip_tokens: int
    ip_dim: int


def check_cache(view: CacheView, expected: ExpectedFeatures, max_bad_fraction: float) -> None:
    root = view.root
    if expected.cache_key is not None and view.manifest.cache_key != expected.cache_key:
        raise CacheMismatchError(
            f"{root}: cache key {view.manifest.cache_key} does not match the key of this config's recipe "
            f"({expected.cache_key}). The features were extracted with different encoders/settings "
            f"(the cache's recipe is in {root}/manifest.json). Point data.cache at a cache made with "
            f"data.recipe, or set data.recipe/data.cache_key to the recipe that made this cache."
        )
    if view.guidance_dim != expected.guidance_dim:
        raise CacheMismatchError(
            f"{root}: guidance features have width {view.guidance_dim}, but model.guidance_dim="
            f"{expected.guidance_dim}; set model.guidance_dim={view.guidance_dim}"
        )
    if view.ip_shape != (expected.ip_tokens, expected.ip_dim):
        raise CacheMismatchError(
            f"{root}: IP features are {list(view.ip_shape)}, but the model expects "
            f"[{expected.ip_tokens}, {expected.ip_dim}] (model.num_tokens, model.dim)"
        )
    if view.skipped_fraction > max_bad_fraction:
        names = ", ".join(f"{s.name} ({s.reason})" for s in view.skipped[:5])
        raise CacheMismatchError(
            f"{root}: {len(view.skipped)} shards ({view.skipped_fraction:.1%} of the samples) are unusable, "
            f"above data.max_bad_fraction={max_bad_fraction}: {names}. Run `img-preprocess verify {root}` "
            f"and re-run preprocessing for those shards."
        )
    if view.num_samples == 0:
        raise CacheMismatchError(f"{root}: the cache holds no readable samples")


class FeatureCacheDataModule(ResumableDataModule[DataConfig]):
    def __init__(self, cfg: DataConfig, expected: ExpectedFeatures) -> None:
        """``cfg`` is the ``data`` block of the training config (see ``config/train.py``)."""
        super().__init__(cfg)
        self.expected = expected
        self.train_view: Optional[CacheView] = None
        self.val_view: Optional[CacheView] = None
        self.samples_read = 0  # checkpointed: training samples read, over all ranks (each pass again)
        self.bad_samples = 0  # checkpointed: of those, failed to decode or held NaN/Inf
        self._noted = [0, 0]  # this rank's read and bad samples since the last optimizer step
        self._pending = PendingChecks()  # device-side NaN/Inf verdicts of training batches not yet counted
        self._bad_logs: dict[int, BadSampleLog] = {}

    # ------------------------------------------------------------------ setup
    def open_caches(self) -> None:
        """Open and check the caches (manifests and shard indexes only: no tensor bytes are read).

        ``img-train`` calls it before it builds models, launches DDP processes or creates the run
        directory, so a wrong or incomplete cache fails in a second, not after minutes of start-up.
        """
        if self.train_view is not None:
            return
        cfg = self.cfg
        self.train_view = CacheView.open(cfg.cache, verify_checksums=cfg.verify_checksums)
        check_cache(self.train_view, self.expected, cfg.max_bad_fraction)
        if cfg.val_cache:
            self.val_view = CacheView.open(cfg.val_cache, verify_checksums=cfg.verify_checksums)
            check_cache(self.val_view, self.expected, cfg.max_bad_fraction)

    def _opened(self) -> CacheView:
        """The training cache (after :meth:`open_caches`)."""
        assert self.train_view is not None, "call open_caches() or setup() first"
        return self.train_view

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_ids is not None:
            return
        self.open_caches()
        cfg = self.cfg
        all_ids = np.arange(self._opened().num_samples, dtype=np.int64)
        if cfg.val_cache:
            assert self.val_view is not None  # opened with the training cache
            self.train_ids = all_ids
            self.val_ids = np.arange(self.val_view.num_samples, dtype=np.int64)
        elif cfg.val_fraction > 0:
            n_val = self._num_held_out(len(all_ids))
            perm = np.random.default_rng([int(cfg.val_split_seed), 7919]).permutation(len(all_ids))
            self.val_view = self.train_view
            self.val_ids = np.sort(all_ids[perm[:n_val]])
            self.train_ids = np.sort(all_ids[perm[n_val:]])
        else:
            self.train_ids = all_ids
        self.check_fits(self._world_size())
        rank_zero_info(self.describe())

    def _num_held_out(self, n: int) -> int:
        """Samples ``data.val_fraction`` holds out of ``n`` (at least one when it is set)."""
        return max(1, int(round(self.cfg.val_fraction * n))) if self.cfg.val_fraction > 0 else 0

    def check_fits(self, world_size: int) -> None:
        """Every rank needs at least one full batch per epoch (the caches must be open)."""
        cfg = self.cfg
        n = self._opened().num_samples
        available = n - self._num_held_out(n) if not cfg.val_cache else n
        if available < cfg.batch_size * world_size:
            raise CacheMismatchError(
                f"{cfg.cache}: {available} training samples cannot fill one batch of "
                f"{cfg.batch_size} on each of {world_size} ranks; lower data.batch_size or use a bigger cache"
            )

    # ------------------------------------------------------------------ loaders
    def _loader(self, view: CacheView, plan: RankPlan) -> ThreadedBatchLoader:
        cfg = self.cfg
        return ThreadedBatchLoader(
            view,
            plan,
            num_workers=cfg.num_workers,
            prefetch=cfg.prefetch_factor,
            pin_memory=cfg.pin_memory and self._on_gpu() and torch.cuda.is_available(),
            max_open_shards=cfg.max_open_shards,
            check_finite=not self.checks_on_device(),
        )

    def _on_gpu(self) -> bool:
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    def checks_on_device(self) -> bool:
        """Whether samples are checked for NaN/Inf on the device (else on the reader thread)."""
        mode = str(self.cfg.finite_check)
        return mode == "device" or (mode == "auto" and self._on_gpu())

    def train_dataloader(self) -> ThreadedBatchLoader:
        assert self.train_view is not None and self.train_ids is not None, "call setup() first"
        self.train_loader = self._loader(self.train_view, self.train_plan())
        return self.train_loader

    def val_dataloader(self) -> ThreadedBatchLoader | list:
        if self.val_view is None or self.val_ids is None:
            return []
        return self._loader(self.val_view, self.eval_plan(self.val_ids))

    # ------------------------------------------------------------------ bad samples
    def on_batch(self, batch: dict[str, Any], training: bool) -> dict[str, Any]:
        if training:  # the reader dropped ``num_bad`` of the batch's samples (all of them checked there)
            num_bad = int(batch["num_bad"])
            self._note(len(batch["index"]) + num_bad, num_bad)
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # 8-bit guidance crossed to the device as stored (half the bytes through the pinned buffers
        # and PCIe); widen it here, on the device, after the copy.
        if not (isinstance(batch, dict) and "guidance" in batch):
            return batch
        if not self.checks_on_device():
            return dequantize_batch(batch)
        batch, verdicts = check_batch(batch)
        if self.trainer is not None and self.trainer.training:
            self._pending.add(verdicts, batch["index"])
        else:  # validation: name its bad samples now (not counted, as the reader's drops are not)
            view = self.val_view if self.val_view is not None else self._opened()
            for i, names in bad_samples(verdicts, batch["index"]):
                self._bad_log(view).report(i, nonfinite_error(names))
        return batch

    def settle_device_checks(self) -> None:
        """Note and name the bad samples the device found in training batches since the last call
        (reads their verdicts back: the device must be done with those batches, or it waits)."""
        bad = self._pending.settle()
        for i, names in bad:
            self._bad_log(self._opened()).report(i, nonfinite_error(names))
        self._note(0, len(bad))

    def _bad_log(self, view: CacheView) -> BadSampleLog:
        return self._bad_logs.setdefault(id(view), BadSampleLog(view))

    def teardown(self, stage: str) -> None:
        self.settle_device_checks()  # named in the log; a batch that reached no optimizer step is not counted
        super().teardown(stage)

    def _note(self, read: int, bad: int) -> None:
        self._noted[0] += read
        self._noted[1] += bad

    def settle_step(self, all_sum: AllSum) -> int:
        """At an optimizer step: add every rank's read and bad samples since the last step to the
        totals and stop when the unusable share passes ``data.max_bad_fraction``; returns the step's
        bad samples over all ranks."""
        self.settle_device_checks()
        read, bad = all_sum(self._noted)
        self._noted = [0, 0]
        self.samples_read += read
        self.bad_samples += bad
        self._check_bad_share()
        return bad

    def _check_bad_share(self) -> None:
        """The rule: samples in skipped shards plus the bad share of what the run reads (a lower bound
        until the end of the epoch, see :mod:`.step_counts`) of the cache's readable samples, as a
        share of the whole cache, must not pass ``data.max_bad_fraction``."""
        view = self._opened()
        total, skipped = view.manifest.num_samples, view.skipped_samples
        planned = self.planned_reads()
        read_share = bad_share_bound(self.bad_samples, self.samples_read, planned)
        share = (skipped + read_share * (total - skipped)) / max(total, 1)
        limit = self.cfg.max_bad_fraction
        if share <= limit:
            return
        in_shards = f" and {skipped} of the cache's {total} sit in skipped shards" if skipped else ""
        raise DamagedCacheError(
            f"{self.cfg.cache}: {self.bad_samples} of the {self.samples_read} training samples read so far (all "
            f"ranks) failed to decode or held NaN/Inf{in_shards}. That is at least {share:.2%} of the cache (counted "
            f"against the {max(self.samples_read, planned)} samples this run reads by the end of its epoch), above "
            f"data.max_bad_fraction={limit}. "
            f"Run `img-preprocess verify {self.cfg.cache}` and re-create the bad shards."
        )

    # ------------------------------------------------------------------ checkpoint state
    def extra_state(self) -> dict[str, Any]:
        # Totals as of the last optimizer step: checkpoints are written after a step, which settled them.
        return {"bad_samples": self.bad_samples, "samples_read": self.samples_read}

    def restore_extra(self, state: dict[str, Any]) -> None:
        self.bad_samples = int(state.get("bad_samples", 0))
        self.samples_read = int(state.get("samples_read", 0))

    def resume_refused(self, problems: list[str]) -> Exception:
        return CacheMismatchError(
            f"the checkpoint's data position was counted under another layout ({'; '.join(problems)}): resuming "
            f"would train on other samples than the interrupted run. Resume with the same number of processes "
            f"and data.batch_size, or start a new run."
        )

    # ------------------------------------------------------------------ info
    def describe(self) -> str:
        v = self.train_view
        if v is None or self.train_ids is None:
            return "data not set up"
        world = self._world_size()
        dtype = str(v.guidance_dtype).removeprefix("torch.")
        return (
            f"cache {v.root}: {v.num_samples} pairs in {len(v.shard_paths)} shards "
            f"({len(v.skipped)} skipped), key {v.manifest.cache_key}, guidance {dtype}; "
            f"train {self.num_train}, val {self.num_val}; {self.steps_per_epoch} steps/epoch at "
            f"{self.cfg.batch_size} x {world} ranks; {math.ceil(v.manifest.num_bytes / 2**20)} MiB"
        )
