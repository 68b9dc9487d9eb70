"""A ``configs/pipeline`` recipe as stages: the ``slurm/*.sbatch`` submission of each and where it writes.

Every stage is submitted through its own script, exactly as a user would (``bash slurm/X.sbatch
[SBATCH OPTIONS --] ARGS`` with the script's environment variables), so the scripts' checks, log
directory and messages hold for the pipeline too. What a stage takes from the ones before it is
added after the recipe's own overrides, so it always wins: the MLLM folder, the cache, the recipe
the cache was made with, the aligner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

from ..config.pipeline import MLLMSource, PipelineConfig
from ..errors import UserError
from . import done as checks


@dataclass
class Stage:
    name: str  # mllm | preprocess | train | eval
    title: str
    output: Path  # what the next stages read, or the stage's main product
    command: list[str]  # run on the login node, from the repository root
    env: dict[str, str] = field(default_factory=dict)
    done: Callable[[], Optional[str]] = lambda: None  # why the output is already there, or None

    def with_dependency(self, job_id: str) -> list[str]:
        """The command with ``--dependency=afterok:JOB`` first among its sbatch options (and
        cancelled, not left pending forever, if that job fails)."""
        return [*self.command[:2], f"--dependency=afterok:{job_id}", "--kill-on-invalid-dep=yes", *self.command[2:]]


def _submission(scripts: Path, script: str, options: list[str], args: list[str]) -> list[str]:
    return ["bash", str(scripts / script), *options, "--", *args]


def _quoted_list(items: list[str]) -> str:
    """A list value for a ``key=[...]`` override whose items contain ``=`` and ``/``."""
    return "[" + ",".join("'" + item.replace("'", "\\'") + "'" for item in items) + "]"


def _absolute(path: Optional[str], key: str) -> str:
    if not path:
        raise UserError(f"{key} must be set")
    return str(Path(path).expanduser().absolute())


def plan_pipeline(cfg: PipelineConfig, scripts: Path) -> list[Stage]:
    """The stages of ``cfg``, in order."""
    root = Path(cfg.root).expanduser().absolute()
    name = cfg.name
    common = {"IMG_LOG_DIR": str(root / "logs"), "IMG_SBATCH_ARGS": " ".join(cfg.sbatch)}
    stages: list[Stage] = []

    m = cfg.mllm
    if m.source == MLLMSource.finetune:
        mllm = root / "runs" / "finetune" / "export"
        stages.append(Stage(
            "mllm", "finetune the MLLM (img-finetune-mllm)", mllm,
            _submission(scripts, "finetune_mllm.sbatch", [f"--job-name={name}-mllm", *m.sbatch], list(m.overrides)),
            {**common, "DATA": _absolute(m.data, "mllm.data"), "CONFIG": m.config,
             "RUN_ROOT": str(root / "runs"), "RUN_NAME": "finetune"},
            partial(checks.mllm_export_done, mllm)))
    elif m.source == MLLMSource.convert:
        mllm = root / "mllm-hf"
        stages.append(Stage(
            "mllm", "convert the released MLLM (img-convert-llava)", mllm,
            _submission(scripts, "convert_llava.sbatch", [f"--job-name={name}-mllm", *m.sbatch],
                        [_absolute(m.convert_from, "mllm.convert_from"), str(mllm), *m.convert_args]),
            dict(common), partial(checks.converted_done, mllm)))
    else:
        mllm = Path(_absolute(m.path, "mllm.path"))
        if checks.mllm_folder_ready(mllm) is None:
            raise UserError(f"mllm.path={mllm}: no config.json there (a transformers model folder is expected)")

    p = cfg.preprocess
    cache = root / "cache"
    encoder_overrides = [o for o in p.overrides if o.startswith("encoders.")] + [f"encoders.mllm.path={mllm}"]
    stages.append(Stage(
        "preprocess", "feature cache (img-preprocess array, then manifest + verify)", cache,
        _submission(scripts, "preprocess.sbatch", [f"--job-name={name}-preprocess", *p.sbatch],
                    [p.config, *p.overrides, f"data.input={_absolute(p.input, 'preprocess.input')}",
                     f"data.output={cache}", f"encoders.mllm.path={mllm}"]),
        {**common, "IMG_FINAL_SBATCH_ARGS": " ".join([f"--job-name={name}-preprocess-final", *p.final_sbatch])},
        partial(checks.cache_done, cache)))

    t = cfg.train
    run_dir = root / "runs" / "train"
    stages.append(Stage(
        "train", "train the aligner (img-train)", run_dir / "export" / "aligner.pth",
        _submission(scripts, "train.sbatch", [f"--job-name={name}-train", *t.sbatch],
                    [*t.overrides, f"data.recipe={p.config}", "data.cache_key=null",
                     f"data.recipe_overrides={_quoted_list(encoder_overrides)}"]),
        {**common, "CACHE": str(cache), "CONFIG": t.config, "RUN_ROOT": str(root / "runs"), "RUN_NAME": "train"},
        partial(checks.train_done, run_dir, cache)))

    e = cfg.eval
    if e.enabled:
        eval_dir, aligner = root / "eval", run_dir / "export" / "aligner.pth"
        stages.append(Stage(
            "eval", "evaluate (img-eval array, then the report)", eval_dir / "report" / "index.html",
            _submission(scripts, "eval.sbatch", [f"--job-name={name}-eval", *e.sbatch],
                        [*e.configs, *e.overrides, f"run_dir={eval_dir}", f"recipe={p.config}", *encoder_overrides,
                         f"img.aligner.checkpoint={aligner}"]),
            {**common, "IMG_FINAL_SBATCH_ARGS": " ".join([f"--job-name={name}-eval-report", *e.final_sbatch])},
            partial(checks.eval_done, eval_dir, aligner)))
    return stages


def job_names(cfg: PipelineConfig) -> list[str]:
    """The names of every job a pipeline submits (to find those still queued)."""
    suffixes = ("mllm", "preprocess", "preprocess-final", "train", "eval", "eval-report")
    return [f"{cfg.name}-{s}" for s in suffixes]
