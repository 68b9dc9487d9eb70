"""When step-level metrics are worth computing: only on the steps Lightning writes to the logger.

``self.log`` costs about a millisecond per call whether or not the value is written, which is a
visible share of a small aligner's step; so per-step metrics are logged only on logging steps.

Lightning writes step metrics when the number of optimizer steps taken, counting the current one,
is a multiple of ``Trainer.log_every_n_steps`` (or the run is stopping). From public state: inside
``training_step`` the current step has not been taken yet (``global_step + 1``); in a callback's
``on_train_batch_end`` it has (``global_step``). A test checks every logged series lands on exactly
Lightning's own logging steps.
"""

from __future__ import annotations

from typing import Any


def is_logging_step(trainer: Any, after_optimizer_step: bool = False) -> bool:
    """Whether Lightning writes this step's metrics (``after_optimizer_step``: called from
    ``on_train_batch_end`` rather than ``training_step``)."""
    if trainer is None:
        return True
    step = trainer.global_step if after_optimizer_step else trainer.global_step + 1
    return step % max(1, int(trainer.log_every_n_steps)) == 0 or bool(trainer.should_stop)
