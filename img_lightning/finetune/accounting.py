"""What a finetune read, skipped and actually trained on, over all ranks, checkpointed.

A run on data whose images never decode used to "train" for every step asked (each batch a no-loss
placeholder, AdamW still stepping), export the base model, and record ``samples_seen`` as if real.
The rules here:

* **Counts are global and exact across resumes.** Each rank notes its training micro-batches
  (samples asked for, skipped by reason, real samples, answer tokens); at every optimizer step the
  ranks sum what they noted (:mod:`img_lightning.data.step_counts`, as for the aligner), so the
  totals are the same on every rank and go into the DataModule's checkpoint state: a resumed run
  continues them.
* **The bad fraction applies from the first sample.** ``data.max_bad_fraction`` bounds the share of
  unusable samples among those the run reads, judged on the lower bound
  :func:`~img_lightning.data.step_counts.bad_share_bound` from the first optimizer step, whatever
  the data size, and never on data that is within it.
* **A step with no supervised token is not a trained step.** When no rank had an answer token in
  an optimizer step's micro-batches, the update is skipped (no parameter has a gradient, so AdamW
  leaves weights and moments alone) and the step is counted in ``empty_steps``, not in the trained
  samples.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import lightning as L

from ..data.step_counts import AllSum, SettleAtStep, bad_share_bound

log = logging.getLogger(__name__)
REASONS = ("corrupt_image", "over_long", "placeholder_in_text")
# pending layout: read, skipped, real samples, answer tokens, one slot per reason
_READ, _SKIPPED, _REAL, _TOKENS = range(4)


class SampleCounts:
    """Global totals (identical on every rank after :meth:`settle`) plus this rank's pending notes."""

    def __init__(self) -> None:
        self.read = 0  # training samples asked for
        self.skipped = 0  # of those, unusable (by reason in ``reasons``)
        self.reasons: Counter = Counter()
        self.trained = 0  # real samples in optimizer steps that had answer tokens
        self.answer_tokens = 0
        self.steps = 0  # optimizer steps settled
        self.empty_steps = 0  # of those, steps without one answer token on any rank (update skipped)
        self._pending = [0] * (4 + len(REASONS))

    def note(self, requested: int, skipped_reasons: list[str], real: int, tokens: int) -> None:
        """One training micro-batch of this rank."""
        p = self._pending
        p[_READ] += requested
        p[_SKIPPED] += len(skipped_reasons)
        p[_REAL] += real
        p[_TOKENS] += tokens
        for reason in skipped_reasons:
            p[4 + REASONS.index(reason)] += 1

    def settle(self, all_sum: AllSum) -> int:
        """Add every rank's notes since the last step to the totals (``all_sum``: the element-wise sum
        over ranks); returns the step's answer tokens over all ranks."""
        window = all_sum(self._pending)
        self._pending = [0] * len(self._pending)
        self.read += window[_READ]
        self.skipped += window[_SKIPPED]
        for i, reason in enumerate(REASONS):
            if window[4 + i]:
                self.reasons[reason] += window[4 + i]
        self.steps += 1
        if window[_TOKENS] == 0:
            self.empty_steps += 1
        else:
            self.trained += window[_REAL]
            self.answer_tokens += window[_TOKENS]
        return window[_TOKENS]

    def reasons_text(self) -> str:
        return ", ".join(f"{n} {r}" for r, n in sorted(self.reasons.items())) or "none skipped"

    def bad_share_bound(self, planned: int) -> float:
        """A lower bound of the unusable share of what the run reads (see the module doc)."""
        return bad_share_bound(self.skipped, self.read, planned)

    def state(self) -> dict[str, Any]:
        return {"samples_read": self.read, "samples_skipped": self.skipped, "skip_counts": dict(self.reasons),
                "samples_trained": self.trained, "answer_tokens": self.answer_tokens, "steps": self.steps,
                "empty_steps": self.empty_steps}

    def restore(self, state: dict[str, Any]) -> None:
        self.read = int(state.get("samples_read", 0))
        self.skipped = int(state.get("samples_skipped", 0))
        self.reasons = Counter({k: int(v) for k, v in (state.get("skip_counts") or {}).items()})
        self.trained = int(state.get("samples_trained", 0))
        self.answer_tokens = int(state.get("answer_tokens", 0))
        self.steps = int(state.get("steps", 0))
        self.empty_steps = int(state.get("empty_steps", 0))


class StepAccounting(SettleAtStep):
    """At each optimizer step: settle the DataModule's counts over the ranks, stop when the bad
    share passes ``data.max_bad_fraction``, and skip the update of a step without answer tokens."""

    def settled(self, trainer: L.Trainer, pl_module: L.LightningModule, value: int) -> None:
        if value:  # the step's answer tokens over all ranks
            return
        for param in pl_module.parameters():
            param.grad = None  # AdamW leaves a parameter without a gradient untouched (moments included)
        log.warning("optimizer step %d had no usable sample on any rank (every sample of its batches was "
                    "skipped): not trained, counted as an empty step", trainer.global_step)


def trained_summary(counts: SampleCounts) -> dict[str, int]:
    """The counts an export manifest and ``summary.json`` record."""
    return {"samples_trained": counts.trained, "answer_tokens": counts.answer_tokens,
            "trained_steps": counts.steps - counts.empty_steps, "empty_steps": counts.empty_steps,
            "samples_read": counts.read, "samples_skipped": counts.skipped}
