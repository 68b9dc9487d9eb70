"""SLURM's time-limit warning (SIGUSR1), remembered from the first moment of a job step.

SIGUSR1's default action ends the process, and ``--signal=USR1@N`` can arrive before training
has begun: SLURM checks time limits every 30 s or so, and a job step spends its first seconds
importing torch, starting DDP and opening the data (a short ``--time``, or a large ``N``, makes
that likely). ``img-train`` and ``img-finetune-mllm`` install this flag-only handler first thing
under ``srun``; :class:`~img_lightning.callbacks.requeue.RequeueOnSignal` takes the flag over when
training starts (and saves at the first step boundary), and gives the signal back to this
handler when training ends, so a warning during the final validation or export is not fatal
either. Light on purpose: nothing heavy is imported before the handler is in place.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

_received = False


def _remember(signum: int, frame: Any) -> None:
    global _received
    _received = True


def under_srun() -> bool:
    """A task of a SLURM job step (what Lightning's ``SLURMEnvironment.detect()`` checks)."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def catch_time_limit_signal(signum: int = signal.SIGUSR1) -> None:
    """Under ``srun``, on the main thread: remember ``signum`` instead of dying of it."""
    if under_srun() and threading.current_thread() is threading.main_thread():
        signal.signal(signum, _remember)


def pop_time_limit_signal() -> bool:
    """Whether the signal came since the last call (the flag is cleared: one warning, one save)."""
    global _received
    received, _received = _received, False
    return received
