"""When step-level metrics are worth computing: only on the steps Lightning writes to the logger.

``self.log`` costs about a millisecond per call whether or not the value is written, which is a
visible share of a small aligner's step; so per-step metrics are logged only on logging steps.
"""

from __future__ import annotations

from typing import Any


def is_logging_step(trainer: Any) -> bool:
    """Lightning's own decision (same value inside training_step and at the step's logger update)."""
    if trainer is None:
        return True
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))
