"""What both training stages' DataModules do identically: rank plans, exact resume, rank/world.

Resume works through Lightning's DataModule state in the checkpoint: every training batch carries
``(epoch, position)``; :meth:`ResumableDataModule.on_before_batch_transfer` (called only for the batch
about to be trained on, never for the one Lightning prefetches) records it, the checkpoint saves it
with the layout it was counted in, and after a restart the plan skips exactly the batches already
trained on in that epoch.

The data epoch is derived from that position too, not from ``trainer.current_epoch``: Lightning
(2.6) never calls ``set_epoch`` on a plan after a mid-epoch resume, and after a resume from a
checkpoint taken on an epoch's last batch its epoch counter runs one ahead of an uninterrupted run.

A stage fills in what a batch is (its loader), what else it counts per batch
(:meth:`~ResumableDataModule.on_batch`), what else its checkpoint state holds, and why a checkpoint
cannot be resumed on its data (:meth:`~ResumableDataModule.resume_problems`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Generic, Optional, Protocol, TypeVar

import lightning as L
import numpy as np

from .batch_loader import BatchLoader
from .plan import Ordering, RankPlan, shuffled
from .position import DataPosition

# The element-wise sum of a list of integers over all ranks (see :mod:`.step_counts`).
AllSum = Callable[[list[int]], list[int]]


class DataBlock(Protocol):
    """What the shared stack reads of a stage's ``data`` config block."""

    @property
    def batch_size(self) -> int: ...

    @property
    def val_batch_size(self) -> Optional[int]: ...

    @property
    def seed(self) -> int: ...


D = TypeVar("D", bound=DataBlock)


class ResumableDataModule(L.LightningDataModule, ABC, Generic[D]):
    """``cfg``: the stage's ``data`` config block (its schema is the type parameter)."""

    def __init__(self, cfg: D) -> None:
        super().__init__()
        self.cfg = cfg
        self.train_ids: Optional[np.ndarray] = None
        self.val_ids: Optional[np.ndarray] = None
        self.position = DataPosition()  # checkpointed: what exact resume restarts from
        self.train_loader: Optional[BatchLoader] = None  # its wait_seconds feed the Throughput callback

    # ------------------------------------------------------------------ ranks
    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    @property
    def num_train(self) -> int:
        """Training samples (over all ranks)."""
        assert self.train_ids is not None, "call setup() first"
        return len(self.train_ids)

    @property
    def num_val(self) -> int:
        """Held-out samples used for validation (0 without any)."""
        assert self.train_ids is not None, "call setup() first"
        return 0 if self.val_ids is None else len(self.val_ids)

    @property
    def steps_per_epoch(self) -> int:
        """Training batches per rank and epoch (optimizer steps x accumulation)."""
        assert self.train_ids is not None, "call setup() first"
        return len(self.train_ids) // (int(self.cfg.batch_size) * self._world_size())

    # ------------------------------------------------------------------ plans
    def train_plan(self, order: Ordering = shuffled) -> RankPlan:
        """This rank's training plan, starting each pass where the checkpointed position says."""
        assert self.train_ids is not None, "call setup() first"
        return RankPlan(self.train_ids, batch_size=int(self.cfg.batch_size), rank=self._rank(),
                        world_size=self._world_size(), seed=int(self.cfg.seed), order=order,
                        start_fn=self._next_pass)

    def eval_plan(self, ids: np.ndarray, pad: bool = False) -> RankPlan:
        """This rank's share of ``ids``, every sample once over the ranks (``pad``: see
        :func:`~.plan.eval_split`)."""
        return RankPlan(ids, batch_size=int(self.cfg.val_batch_size or self.cfg.batch_size), rank=self._rank(),
                        world_size=self._world_size(), shuffle=False, pad=pad)

    def _next_pass(self) -> tuple[int, int]:
        """``(epoch, first batch)`` of a new training pass over the data."""
        return self.position.next_pass(self.steps_per_epoch)

    # ------------------------------------------------------------------ batches
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is None or not isinstance(batch, dict) or "position" not in batch:
            return batch
        training = bool(self.trainer.training)
        if training:
            self.position.trained(batch)
        return self.on_batch(batch, training)

    def on_batch(self, batch: dict[str, Any], training: bool) -> dict[str, Any]:
        """A batch about to be trained on (``training``) or evaluated, before its copy to the device:
        the stage's per-batch accounting."""
        return batch

    def settle_step(self, all_sum: AllSum) -> int:
        """At an optimizer step (:class:`~.step_counts.SettleAtStep`): add every rank's counts since the
        last step to the totals and apply the stage's rules on them; returns a stage-defined count of
        the step over all ranks. A DataModule that keeps no per-step counts settles nothing."""
        return 0

    def planned_reads(self) -> int:
        """Training samples the run will have read, over all ranks, by the end of the current data
        epoch, or of the run when ``max_steps`` ends it first."""
        per_step = int(self.cfg.batch_size) * self._world_size()
        planned = self.steps_per_epoch * per_step * (self.position.epoch + 1)
        trainer = self.trainer
        if trainer is not None and trainer.max_steps > 0:
            planned = min(planned, int(trainer.max_steps) * int(trainer.accumulate_grad_batches) * per_step)
        return planned

    def teardown(self, stage: str) -> None:
        if self.train_loader is not None:
            self.train_loader.close()  # its reader threads; a new pass starts them again

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {**self.position.state(self._world_size(), int(self.cfg.batch_size)), **self.extra_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        problems = self.resume_problems(state_dict)
        problems += DataPosition.layout_problems(state_dict, self._world_size(), int(self.cfg.batch_size))
        if problems:
            raise self.resume_refused(problems)
        self.position.restore(state_dict)
        self.restore_extra(state_dict)

    def extra_state(self) -> dict[str, Any]:
        """What the stage checkpoints next to the position (counters)."""
        return {}

    def restore_extra(self, state: dict[str, Any]) -> None:
        """Continue the stage's counters from a checkpoint's :meth:`extra_state`."""

    def resume_problems(self, state: dict[str, Any]) -> list[str]:
        """Why ``state`` was not counted on this data (empty: it was); the layout is checked here."""
        return []

    @abstractmethod
    def resume_refused(self, problems: list[str]) -> Exception:
        """The error that refuses a resume for ``problems``."""
