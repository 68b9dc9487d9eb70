"""One prompt of a prompt set, and a SLURM array task's share of a set.

The ``uid`` (not the row position in a filtered list) names every image and seeds it, so a chunk of
an array or a resumed run produces exactly the images of a single full run. The loaders of the
official prompt files are in :mod:`img_lightning.evaluation.prompts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class PromptRecord:
    uid: str  # stable id inside its prompt set (row id or zero-padded line index)
    text: str
    category: Optional[str] = None  # benchmark category / style / challenge
    subtype: Optional[str] = None  # T2I-CompBench complex: "spatial" | "action" | "spatial_action"
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def chunk(records: Sequence[PromptRecord], index: int, count: int) -> list[PromptRecord]:
    """Task ``index`` of ``count`` takes every ``count``-th prompt (balanced across categories)."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"chunk index {index} out of range for {count} chunks")
    return list(records[index::count])
