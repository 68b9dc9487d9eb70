"""Run directories: where a run lives, what it was, and where it resumes from.

The directory is ``{run.root}/{run.name}``: no timestamps, so every rank computes the same path and
a SLURM requeue (same job id, passed as the name by ``slurm/train.sbatch``) lands in the same place.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from .config.loading import to_yaml


def run_directory(run_cfg: Any) -> Path:
    return Path(run_cfg.root) / run_cfg.name


def git_revision(start: Path | None = None) -> dict[str, Any]:
    """SHA of the checkout this code runs from (and whether it has uncommitted changes)."""
    start = start or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=start, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=start,
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
        )
        return {"sha": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"sha": "unknown", "dirty": None}


def write_run_info(run_dir: Path, cfg: Any, extra: Optional[dict] = None) -> None:
    """Resolved config + provenance, written atomically (rank 0 only)."""
    import lightning
    import torch

    run_dir.mkdir(parents=True, exist_ok=True)
    info = {
        "git": git_revision(),
        "argv": sys.argv,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "host": platform.node(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        **(extra or {}),
    }
    _atomic_write(run_dir / "config.yaml", to_yaml(cfg))
    _atomic_write(run_dir / "run_info.json", json.dumps(info, indent=1, sort_keys=True) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def resolve_resume(run_dir: Path, ckpt_path: Optional[str]) -> Optional[str]:
    """Turn ``run.ckpt_path`` into a checkpoint file or None (fresh start).

    ``"last"``: the newest of ``checkpoints/last.ckpt`` and Lightning's SLURM pre-emption checkpoints
    (``hpc_ckpt_*.ckpt``); a fresh start when there is none, so requeue scripts can always pass it.
    ``None`` in a directory that already has checkpoints is refused instead of silently mixing runs.
    """
    candidates = [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")]
    existing = [p for p in candidates if p.is_file()]
    if ckpt_path is None:
        if existing:
            raise FileExistsError(
                f"{run_dir} already holds checkpoints ({existing[0].name}). Resume with run.ckpt_path=last, "
                f"or start a new run with another run.name."
            )
        return None
    if ckpt_path == "last":
        return str(max(existing, key=lambda p: p.stat().st_mtime)) if existing else None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"run.ckpt_path={ckpt_path}: no such checkpoint")
    return ckpt_path
