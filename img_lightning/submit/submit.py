"""Submit a pipeline's stages in order, each after the previous one succeeded (``afterok``).

A stage whose output is done (:mod:`.done`) is skipped, unless a stage before it runs again; a
pipeline whose jobs are still queued is refused (two copies would write the same directories).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

from ..errors import UserError
from .plan import Stage

SUBMITTED = re.compile(r"^submitted .*\bjob (\d+)", re.MULTILINE)


@dataclass
class StageResult:
    stage: Stage
    job_ids: list[str] = field(default_factory=list)  # empty when skipped
    skipped: Optional[str] = None  # why
    output: str = ""  # what the stage's script printed


def queued_jobs(names: Sequence[str]) -> list[str]:
    """``id name state`` of this user's pending or running jobs with one of ``names``."""
    done = subprocess.run(["squeue", "-h", "--me", f"--name={','.join(names)}", "-o", "%i %j %T"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise UserError(f"squeue failed (exit {done.returncode}): {done.stderr.strip()}; is SLURM reachable from here?")
    return [line for line in done.stdout.splitlines() if line.strip()]


def submit_stages(stages: Sequence[Stage], dry_run: bool = False,
                  say: Callable[[str], None] = print) -> list[StageResult]:
    """Skip what is done, submit the rest with dependencies; returns what happened to each stage."""
    results: list[StageResult] = []
    previous: Optional[str] = None  # the job the next stage waits for
    rerun = False  # once a stage runs, every later one does
    for stage in stages:
        why = None if rerun else stage.done()
        if why is not None:
            say(f"{stage.name}: skipped, {stage.output} is done ({why})")
            results.append(StageResult(stage, skipped=why))
            continue
        rerun = True
        command = stage.with_dependency(previous) if previous else stage.command
        if dry_run:
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in stage.env.items() if v)
            say(f"{stage.name}: would run {env} {shlex.join(command)}")
            previous = f"<{stage.name}>"
            results.append(StageResult(stage, job_ids=[previous]))
            continue
        done = subprocess.run(command, env={**os.environ, **stage.env}, capture_output=True, text=True, check=False)
        ids = SUBMITTED.findall(done.stdout)
        if done.returncode != 0 or not ids:
            submitted = [j for r in results for j in r.job_ids]
            raise UserError(
                f"{stage.name}: {stage.command[1]} failed (exit {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()}"
                + (f"\nalready submitted and waiting for it: jobs {', '.join(submitted)} (scancel them, or let them "
                   f"fail on the dependency); fix the problem and submit the pipeline again: finished stages are "
                   f"skipped" if submitted else ""))
        say(f"{stage.name}: {stage.title}\n" + "\n".join("  " + line for line in done.stdout.strip().splitlines()))
        previous = ids[-1]
        results.append(StageResult(stage, job_ids=ids, output=done.stdout))
    return results
