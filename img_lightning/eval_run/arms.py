"""The arms of an evaluation run (folders under ``{run}/images/``) and a task's chunk tag.

- ``base``: the pipeline alone; ``img_r{r}``: round r of IMG; ``control``: the re-generation
  settings at IP scale 0 (see :mod:`img_lightning.generation.runner`).
- The chunk tag ``{index}of{count}`` names the files one SLURM array task writes, so concurrent
  tasks never append to the same file.
"""

from __future__ import annotations

from ..config.eval import EvalConfig


def img_arm(round_index: int) -> str:
    return f"img_r{round_index}"


def source_arm(round_index: int) -> str:
    """The arm whose images IMG round ``round_index`` re-generates: base, then the previous round."""
    return "base" if round_index == 1 else img_arm(round_index - 1)


def arm_names(rounds: int, control: bool) -> list[str]:
    """Every arm of a run, in report order: base, control (when enabled), then the IMG rounds."""
    return ["base", *(["control"] if control else []), *[img_arm(r) for r in range(1, rounds + 1)]]


def chunk_tag(cfg: EvalConfig) -> str:
    """``{chunk.index}of{chunk.count}`` of an evaluation config."""
    return f"{cfg.chunk.index}of{cfg.chunk.count}"
