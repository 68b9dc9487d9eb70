"""Everything ``img-eval`` will need, checked before it writes anything or generates an image.

An evaluation spends hours on base images before it first touches the aligner, the MLLM or a
scorer; a typo in one of their paths used to surface only then. :func:`preflight` finds, in one
pass, and reports in one error naming each key:

- every key still ``???`` (inside lists too: ``scorers.0.checkpoint``);
- the prompt files (the set itself, T2I-CompBench's complex subset lists, the question file);
- the generate stage's models (pipeline, UNet, IP-Adapter, IP encoder, MLLM) without loading them,
  and the aligner, loaded, with its widths compared with the encoders' and the adapter's;
- every scorer's model, processor and checkpoint files (:func:`.scorers.check_scorers`).

``generate`` checks the scorers too (the SLURM array scores right after generating); ``score``
checks only the scorers; ``report`` loads no model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from omegaconf import OmegaConf

from ..config.eval import EvalConfig
from ..config.loading import ConfigError, missing_keys, where_to_get
from ..config.node import as_node
from ..errors import Problems
from ..eval_run import PromptRecord

if TYPE_CHECKING:
    from ..aligner import ImplicitAligner


class PreflightError(ConfigError):
    """The run cannot start; the message lists every problem found, each with its config key."""


@dataclass
class Ready:
    """What the checks produced and the stages reuse."""

    prompts: list[PromptRecord]
    aligner: Optional[ImplicitAligner] = None  # the loaded aligner (generate/all), None otherwise


def _set(cfg: EvalConfig, key: str) -> bool:
    """A key with a value (not ``???``)."""
    node, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(as_node(cfg), node) if node else cfg
    return parent is not None and not OmegaConf.is_missing(parent, leaf)


def preflight(cfg: EvalConfig, stage: str) -> Ready:
    """Check everything ``stage`` needs; raise one :class:`PreflightError` listing every problem."""
    from .prompts import load_prompt_set
    from .scorers import check_scorers, missing_value_hint

    problems = Problems()
    for key in missing_keys(cfg):
        hint = where_to_get(cfg, key) or missing_value_hint(cfg.scorers, key)
        problems.add(f"{key}: has no value (???); set it in a YAML file or as {key}=..."
                     + (f"; {hint}" if hint else ""))
    prompts: Optional[list[PromptRecord]] = None
    if all(_set(cfg, k) for k in ("prompts.format", "prompts.path")):
        prompts = problems.check(load_prompt_set, cfg, where="prompts.path")
    aligner = None
    if stage in ("generate", "all"):
        from ..generation.requirements import check_generation

        aligner = check_generation(cfg, problems)
    if stage in ("generate", "score", "all"):
        check_scorers(cfg.scorers, problems)
    if problems:
        where = cfg.run_dir if _set(cfg, "run_dir") else "the run directory"
        raise PreflightError(problems.message(
            f"img-eval {stage} cannot start: {len(problems)} problem(s), nothing was written to {where}:"))
    assert prompts is not None  # no problem means the prompt set loaded
    return Ready(prompts=prompts, aligner=aligner)
