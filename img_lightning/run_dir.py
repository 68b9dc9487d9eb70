"""Run directories: where a run lives, what it was, and where it resumes from.

The directory is ``{run.root}/{run.name}``: no timestamps, so every rank computes the same path and
a SLURM requeue (same job id, passed as the name by ``slurm/train.sbatch``) lands in the same place.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from .atomic import atomic_write, atomic_write_json
from .checkpoint_files import check_intact, resume_candidate
from .config.changes import config_changes, describe_changes
from .config.loading import ConfigError, load_config, to_container, to_yaml
from .config.stages import RunBlock, StageConfig

CONFIG_NAME = "config.yaml"
RESUMES_DIR = "resumes"
REQUEUE_DIR = "requeue"  # SLURM requeue checkpoints (callbacks/requeue.py): requeue-N.ckpt
REQUEUE_PATTERN = "requeue-*.ckpt"
LEGACY_REQUEUE_PATTERN = "hpc_ckpt_*.ckpt"  # what older versions wrote at the top of the run directory


def run_directory(run_cfg: RunBlock) -> Path:
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


def write_run_info(run_dir: Path, cfg: object, extra: Optional[dict] = None, resumed: bool = False,
                   changes: Optional[dict] = None) -> Path:
    """Resolved config + provenance, written atomically (rank 0 only).

    A fresh run writes ``config.yaml`` and ``run_info.json`` at the top of its directory; they stay
    the record of what the run is. Each resume writes its own pair under ``resumes/NNN/`` (with
    the config changes it was allowed to make), never overwriting the original. Returns the
    directory written to.
    """
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
    target = run_dir
    if resumed and (run_dir / CONFIG_NAME).is_file():
        done = sorted(p for p in (run_dir / RESUMES_DIR).glob("[0-9][0-9][0-9]") if p.is_dir())
        target = run_dir / RESUMES_DIR / f"{len(done) + 1:03d}"
        target.mkdir(parents=True, exist_ok=True)
        info["config_changes"] = {k: list(v) for k, v in (changes or {}).items()}
    atomic_write(target / CONFIG_NAME, to_yaml(cfg))
    atomic_write_json(target / "run_info.json", info, sort_keys=True)
    return target


def check_resume_config(run_dir: Path, cfg: StageConfig, schema: type[StageConfig], free_keys: frozenset[str]) -> dict:
    """Refuse to resume ``run_dir`` with a config that changes what the run trains on or how.

    Compares ``cfg`` with the run's saved ``config.yaml`` (both completed with ``schema``'s
    defaults). Differences in ``free_keys`` or in ``run.allow_config_change`` are allowed and
    returned (``{key: (saved, now)}``, to be recorded); any other difference is a
    :class:`ConfigError` listing every such key. A run without a saved config passes.
    """
    saved_path = run_dir / CONFIG_NAME
    if not saved_path.is_file():
        return {}
    allowed_extra = set(cfg.run.allow_config_change or ())
    try:
        saved = load_config(schema, [saved_path], require_complete=False)
    except ConfigError as err:
        raise ConfigError(
            f"cannot resume {run_dir}: its saved {CONFIG_NAME} does not load with this version ({err}). "
            f"Start a new run (another run.name) or use the version that made it."
        ) from None
    changes = config_changes(to_container(saved), to_container(cfg))
    unknown = sorted(k for k in allowed_extra if not _is_key_of(k, to_container(cfg)))
    if unknown:
        raise ConfigError(f"run.allow_config_change names keys that do not exist: {unknown}")
    refused = [k for k in changes if k not in free_keys and not _allowed(k, allowed_extra)]
    if refused:
        listing = ",".join(refused)
        raise ConfigError(
            f"cannot resume {run_dir}: the config differs from the run's saved {saved_path.name} in keys "
            f"that change the data or the optimisation:\n{describe_changes(changes, refused)}\n"
            f"Resume with the saved values, start a new run (another run.name), or, if the change is "
            f"deliberate, allow it explicitly: run.allow_config_change=[{listing}] (recorded in the run "
            f"directory)."
        )
    return changes


def _allowed(key: str, allowed: set[str]) -> bool:
    """``key`` or one of its parents (``data`` allows ``data.cache``) is allowed."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in allowed for i in range(1, len(parts) + 1))


def _is_key_of(key: str, tree: dict) -> bool:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def lightning_root(run_dir: Path) -> Path:
    """The Trainer's ``default_root_dir``: a folder in the run directory that nothing writes to.

    Under SLURM, Lightning loads the newest ``hpc_ckpt_*.ckpt`` of its root directory into the
    module in every ``fit``/``validate``/``test`` call without a ``ckpt_path``. Our requeue
    checkpoints live elsewhere (``requeue/``), but run directories of older versions hold
    ``hpc_ckpt_*.ckpt`` at their top: with the run directory as its root, Lightning would put such a
    file's weights into the module before the final validation and export. Checkpoints and logs
    are written where the callbacks and the logger say, never here.
    """
    return run_dir / ".lightning"


def resolve_resume(run_dir: Path, ckpt_path: Optional[str]) -> Optional[str]:
    """Turn ``run.ckpt_path`` into a checkpoint file or None (fresh start).

    ``"last"``: the newest of ``checkpoints/last.ckpt``, the SLURM requeue checkpoints
    (``requeue/requeue-N.ckpt``) and those of older versions (``hpc_ckpt_*.ckpt`` at the top); a
    fresh start when there is none, so requeue scripts can always pass it. ``None`` in a directory
    that already has checkpoints is refused instead of silently mixing runs. A checkpoint may be a
    file or a directory (FSDP's sharded checkpoints).
    """
    candidates = [run_dir / "checkpoints" / "last.ckpt", *(run_dir / REQUEUE_DIR).glob(REQUEUE_PATTERN),
                  *run_dir.glob(LEGACY_REQUEUE_PATTERN)]
    existing = [p for p in candidates if p.is_file() or (p.is_dir() and (p / ".metadata").is_file())]
    if ckpt_path is None:
        if existing:
            raise FileExistsError(
                f"{run_dir} already holds checkpoints ({existing[0].name}). Resume with run.ckpt_path=last, "
                f"or start a new run with another run.name."
            )
        return None
    if ckpt_path == "last":
        return resume_candidate(run_dir, existing)
    if not Path(ckpt_path).exists():
        raise FileNotFoundError(f"run.ckpt_path={ckpt_path}: no such checkpoint")
    check_intact(ckpt_path)
    return ckpt_path
