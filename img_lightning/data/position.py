"""Where training is in its data: the position a checkpoint saves so a resumed run sees exactly the
batches an uninterrupted one would have.

Both DataModules (the aligner's feature cache, the MLLM finetuning triplets) shard one seeded
permutation per epoch over ranks, so a position is just ``(epoch, batches done in it)`` on each
rank. It only means the same samples under the same layout, so the layout it was counted in
(world size, per-rank batch) is saved with it and a resume under another layout is refused.

The epoch is tracked from the batches handed to the training step, not from Lightning's
``current_epoch``: after resuming from a checkpoint taken on an epoch's last batch, Lightning's
counter is one ahead of an uninterrupted run's.
"""

from __future__ import annotations

from typing import Any, Optional


class DataPosition:
    def __init__(self) -> None:
        self.epoch = 0
        self.batches_done = 0  # batches of `epoch` already trained on (per rank)
        self._resume: Optional[tuple[int, int]] = None
        self._trained_any = False

    def next_pass(self, batches_per_epoch: int) -> tuple[int, int]:
        """``(epoch, first batch)`` of a new training pass (a loader's ``iter()``)."""
        if self._resume is not None:
            epoch, done = self._resume
            self._resume = None
            return (epoch, done) if done < batches_per_epoch else (epoch + 1, 0)
        # A new pass follows the epoch of the last batch trained on (stable if iter() is called twice).
        return (self.epoch + 1, 0) if self._trained_any else (0, 0)

    def trained(self, batch: Any) -> None:
        """Record a batch handed to the training step (its ``epoch`` and ``position`` entries)."""
        self.epoch = int(batch["epoch"])
        self.batches_done = int(batch["position"]) + 1
        self._trained_any = True

    def state(self, world_size: int, batch_size: int) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "world_size": int(world_size),
                "batch_size": int(batch_size)}

    @staticmethod
    def layout_problems(state: dict[str, Any], world_size: int, batch_size: int) -> list[str]:
        """Why ``state`` cannot be resumed under this layout (empty: it can). Old checkpoints that
        did not record their layout pass."""
        return [f"{key} is {now}, the checkpoint's run had {state[key]}"
                for key, now in (("world_size", int(world_size)), ("batch_size", int(batch_size)))
                if state.get(key) not in (None, now)]

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (check :meth:`layout_problems` first)."""
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])
        self._resume = (self.epoch, self.batches_done)
        self._trained_any = True
