"""A real one-node SLURM for the ``slurm`` tests (slurm/local_cluster.sh) and what they do with it:
a fresh copy of the checkout, submissions, waiting for jobs, reading their state."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "local_cluster.sh"
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def why_no_slurm() -> Optional[str]:
    """Why a cluster cannot be had here, or None (installed, or installable: root with apt-get)."""
    if sys.platform != "linux":
        return "SLURM's local cluster needs Linux"
    daemons = ("sbatch", "slurmctld", "slurmd", "munged")
    installed = all(shutil.which(t) or Path(f"/usr/sbin/{t}").exists() for t in daemons)
    if os.geteuid() != 0:
        return "slurm/local_cluster.sh runs slurmd and munged as root; these tests run as another user"
    if not installed and not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install slurm-wlm and munge"
    return None


def cluster_running() -> bool:
    return subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True, text=True).returncode == 0


@dataclass
class Job:
    id: str
    state: str
    restarts: int
    exit_code: str
    reason: str
    start: str
    end: str


def show_jobs(job_id: str) -> list[Job]:
    """Every record of a job (an array has one per task)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    jobs = []
    for line in out.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        task = fields.get("ArrayTaskId", "")
        name = f"{fields['ArrayJobId']}_{task}" if task.isdigit() else fields["JobId"]
        jobs.append(Job(name, fields["JobState"], int(fields.get("Restarts", 0)), fields.get("ExitCode", ""),
                        fields.get("Reason", ""), fields.get("StartTime", ""), fields.get("EndTime", "")))
    return jobs


def wait_for(job_ids: list[str], timeout: float, logs: Optional[Path] = None) -> dict[str, Job]:
    """Wait until every job (and every array task) has finished; returns their last records."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = {j.id: j for i in job_ids for j in show_jobs(i)}
        if all(j.state in FINISHED for j in jobs.values()):
            return jobs
        if time.monotonic() > deadline:
            pytest.fail(f"jobs not finished after {timeout:.0f} s: {list(jobs.values())}\n{log_tails(logs)}")
        time.sleep(0.5)


def log_tails(folder: Optional[Path], lines: int = 15) -> str:
    if folder is None or not folder.is_dir():
        return ""
    parts = []
    for log in sorted(folder.glob("*.out")):
        parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(parts)


def assert_completed(jobs: dict[str, Job], logs: Optional[Path] = None) -> None:
    bad = [j for j in jobs.values() if j.state != "COMPLETED" or j.exit_code != "0:0"]
    assert not bad, f"{bad}\n{log_tails(logs)}"


def submitted_ids(stdout: str) -> list[str]:
    return re.findall(r"^\s*submitted .*\bjob (\d+)", stdout, re.MULTILINE)


def fresh_checkout(dest: Path) -> Path:
    """The checkout's tracked files (and new ones not ignored), as a user's fresh clone has them:
    no logs/, no runs/, no build output."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.split(b"\0")
    dest.mkdir(parents=True)
    for name in filter(None, files):
        source = REPO / os.fsdecode(name)
        if not os.path.lexists(source):
            continue  # deleted in the working tree
        target = dest / os.fsdecode(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)
    return dest


def job_environment(**extra: str) -> dict[str, str]:
    """What a user's shell has: the virtual environment's commands first on PATH, models offline,
    one thread per process (2 shared cores)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "IMG_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def run_ok(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout
