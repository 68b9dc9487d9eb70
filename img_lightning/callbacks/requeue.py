"""Save and requeue on SLURM's time-limit warning, at an optimizer-step boundary, all ranks together.

``#SBATCH --signal=SIGUSR1@120`` warns every task two minutes before the time limit. Lightning's
own auto-requeue saves its checkpoint *inside* the signal handler, i.e. wherever the main thread
happens to be: in the middle of a step (the batch is already counted as trained in the data
position but its update is not in the weights, so the resumed run skips it; with gradient
accumulation, the accumulated gradients are lost while their batches count as done), and under
DDP/FSDP with the ranks at different points (the checkpoint's barrier can meet another rank's
gradient all-reduce). Either way the resumed run is silently not the run that was interrupted.

Here the handler only sets a flag. After every optimizer step the ranks agree on it (one boolean
all-reduce, next to the step's own collectives) and, when any rank was signalled, every rank saves
the same checkpoint at the same step boundary (the state ``ModelCheckpoint`` would save there, so
the exact-resume guarantees hold) and training stops.

That save is the last thing the job writes. The callback is a :class:`Checkpoint`, which Lightning
runs after every ``ModelCheckpoint``, so their saves of that step come first and are in its state;
their ``last.ckpt`` at the end of training is switched off (Lightning writes one then when none was
written in the process, and ``run.ckpt_path=last`` would take that newer file);
the validation Lightning runs when training stops early is skipped (it would let the best-model
``ModelCheckpoint`` write a new ``best-*.ckpt`` and delete the one the saved state points to, and
the resumed job would die on the missing file, or pick its best from a validation the
uninterrupted run never made); a validation that is due at that step anyway runs, and the save
waits for it (the resumed run would skip it: Lightning takes a checkpoint saved before a due
validation as one saved after it); and the job is requeued (:meth:`RequeueOnSignal.requeue_job`) only
after ``fit`` has returned, since ``scontrol requeue`` terminates it.

The checkpoints go to ``requeue/requeue-N.ckpt`` in the run directory, not to the
``hpc_ckpt_N.ckpt`` of Lightning's own auto-requeue: under SLURM Lightning restores the newest
``hpc_ckpt_*.ckpt`` of its root directory in every ``validate()``/``test()`` without a
``ckpt_path``, which put the requeue point's weights back into the module before the export.
``run.ckpt_path=last`` (:func:`img_lightning.run_dir.resolve_resume`) finds both names.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint

from ..errors import UserError
from ..run_dir import REQUEUE_DIR, REQUEUE_PATTERN
from ..time_limit_signal import pop_time_limit_signal

log = logging.getLogger(__name__)


class RequeueError(UserError):
    """The run was saved for a requeue, but SLURM did not requeue the job."""


def next_requeue_checkpoint(folder: Path) -> Path:
    """``requeue-{n+1}.ckpt`` after the highest ``n`` in ``folder``."""
    numbers = [int(m.group(1)) for p in folder.glob(REQUEUE_PATTERN)
               if (m := re.fullmatch(r"requeue-(\d+)\.ckpt", p.name))]
    return folder / f"requeue-{max(numbers, default=0) + 1}.ckpt"


def validation_due(trainer: Trainer) -> bool:
    """Whether Lightning validates after the step just taken, stop or no stop (what its epoch loop
    decides for an int ``val_check_interval``)."""
    loop = trainer.fit_loop.epoch_loop
    every = trainer.val_check_batch
    if not trainer.enable_validation or not every or every == float("inf"):
        return False
    index = loop.total_batch_idx if trainer.check_val_every_n_epoch is None else loop.batch_idx
    return (index + 1) % int(every) == 0


class RequeueOnSignal(Checkpoint):
    """On ``signum``: checkpoint at the next optimizer-step boundary and stop; the caller then
    requeues the SLURM job (:meth:`requeue_job`).

    ``folder`` is the run directory (the checkpoints go to its ``requeue/``). ``requeued_at`` is the
    global step saved (None when no signal came): the caller skips its end-of-run work (final
    validation, export) for a run that will continue in the requeued job.
    """

    def __init__(self, folder: Path, job_id: Optional[str], signum: int = signal.SIGUSR1,
                 requeue_command: Sequence[str] = ("scontrol", "requeue")) -> None:
        self.folder = Path(folder) / REQUEUE_DIR
        self.job_id = job_id
        self.signum = signum
        self.requeue_command = tuple(requeue_command)
        self.signalled = False
        self.requeued_at: Optional[int] = None
        self.checkpoint: Optional[Path] = None
        self._previous: Any = None
        self._installed = False
        self._last_step: Optional[int] = None
        self._pending = False  # stopping; the save waits for this step's validation

    # -- the handler: a flag only -------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signalled = True

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self._installed:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("not on the main thread: no handler for signal %s, so no requeue on the time limit",
                        self.signum)
            return
        self._previous = signal.signal(self.signum, self._on_signal)
        self._installed = True
        if self.signum == signal.SIGUSR1 and pop_time_limit_signal():
            self.signalled = True  # warned while the job was starting: save at the first step boundary

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._installed:
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    # -- the decision, at step boundaries -----------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The step training starts at (0, or the resumed one): the first micro-batches of an
        # accumulation window end at this step too and must not look like a step boundary.
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._last_step:
            return  # inside a gradient-accumulation window: no optimizer step yet
        self._last_step = trainer.global_step
        if self.requeued_at is not None or self._pending:
            return
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        trainer.should_stop = True
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                # the requeue checkpoint is this job's resume point: no last.ckpt when training ends
                # (Lightning writes one then if none was written in this process), after it
                callback.save_last = False
        if validation_due(trainer):
            # This step's validation runs as it would have (a resumed run skips the validation of
            # the step it resumes at); the save follows it and the ModelCheckpoint saves after it.
            self._pending = True
            return
        self._save(trainer)
        # No validation on this stop: it would be one the uninterrupted run never makes, and the
        # best-model ModelCheckpoint would replace the best-*.ckpt the saved state points to.
        trainer.fit_loop.epoch_loop._skip_next_val = True

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending and not trainer.sanity_checking:
            self._save(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending:  # the validation did not run after all: a run that stopped must be saved
            self._save(trainer)

    def _save(self, trainer: Trainer) -> None:
        self._pending = False
        if trainer.is_global_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
        path = Path(trainer.strategy.broadcast(str(next_requeue_checkpoint(self.folder))))  # one name on every rank
        trainer.save_checkpoint(path)
        self.requeued_at, self.checkpoint = trainer.global_step, path
        if trainer.is_global_zero:
            log.info("time-limit signal: saved %s at step %d", path, trainer.global_step)

    def requeue_job(self, trainer: Trainer) -> bool:
        """Rank 0 asks SLURM to requeue this job (which ends it): call it after ``fit`` returned,
        so nothing is written after the requeue checkpoint. True when the job was requeued; a
        failed ``scontrol requeue`` raises :class:`RequeueError`, so the job fails and says why
        instead of ending as if training were complete."""
        if self.requeued_at is None or not trainer.is_global_zero:
            return False
        if not self.job_id:
            log.warning("no SLURM job id: not requeued; resume with run.ckpt_path=last")
            return False
        # an array task is requeued under its own id (SLURM_ARRAY_JOB_ID_SLURM_ARRAY_TASK_ID)
        cmd = [*self.requeue_command, self.job_id]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            problem = "" if done.returncode == 0 else f"exit {done.returncode}: {(done.stderr or done.stdout).strip()}"
        except OSError as err:
            problem = str(err)
        if problem:
            raise RequeueError(f"saved {self.checkpoint} at step {self.requeued_at}, but `{' '.join(cmd)}` failed "
                               f"({problem}): submit the job again; run.ckpt_path=last resumes from that checkpoint")
        log.info("requeued SLURM job %s", self.job_id)
        return True


def slurm_requeue_callback(folder: Path) -> Optional[RequeueOnSignal]:
    """The callback for a run under ``srun`` (None otherwise)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return None
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_job}_{array_task}" if array_job and array_task else os.environ.get("SLURM_JOB_ID")
    return RequeueOnSignal(folder, job_id)
