"""T2I-CompBench "3-in-1" complex score: the mean of the component scores that fit the prompt.

As in ``3_in_1_eval/3_in_1.py``: prompts listed in ``complex_val_spatial.txt`` average attribute
(BLIP-VQA) and spatial; those in ``complex_val_action.txt`` average attribute and action (CLIP
non-spatial); all others average the three. The prompt matching rule is the script's (text before
the first '.', lower-cased). The action component scores the prompt without its adjectives, as
T2I-CompBench's ``CLIP_similarity.py --complex`` does (spaCy ADJ tokens dropped; with
``noun_phrases: rules`` a word list stands in). The spatial component is the detector PROXY (see
``spatial.py``), so the 3-in-1 score is always labelled a proxy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from ...config.eval import ScorerConfig
from ...config.loading import ConfigError
from ...errors import Problems
from ..prompts import COMPLEX_SUBSET_FILES, PromptFileError, _complex_key, _lines
from .base import Scorer, register, register_check
from .noun_phrases import adjective_stripper, is_exact, resolve_noun_phrases


def complex_subtypes(subset_dir: str | Path) -> dict[str, set[str]]:
    where = Path(subset_dir)
    out = {}
    for subtype, fname in COMPLEX_SUBSET_FILES.items():
        path = where / fname
        if not path.is_file():
            raise PromptFileError(f"t2i_complex: {path} not found (set subset_dir to T2I-CompBench's dataset dir)")
        out[subtype] = {_complex_key(t) for t in _lines(path)}
    return out


def three_in_one(subtype: str, attribute: Tensor, spatial: Tensor, action: Tensor) -> Tensor:
    if subtype == "spatial":
        return (attribute + spatial) / 2
    if subtype == "action":
        return (attribute + action) / 2
    return (attribute + spatial + action) / 3


class ComplexScorer(Scorer):
    def __init__(self, attribute: Scorer, spatial: Scorer, action: Scorer, subsets: dict[str, set[str]],
                 name: str = "complex_3in1", noun_phrases: str = "rules") -> None:
        self.attribute, self.spatial, self.action = attribute, spatial, action
        self.subsets = subsets
        self.noun_phrases = resolve_noun_phrases(noun_phrases)
        self.strip_adjectives = adjective_stripper(self.noun_phrases)
        self.name = name
        self.batch_size = max(attribute.batch_size, 1)

    def subtype(self, prompt: str) -> str:
        key = _complex_key(prompt)
        if key in self.subsets["spatial"]:
            return "spatial"
        if key in self.subsets["action"]:
            return "action"
        return "spatial_action"

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> Tensor:
        att = self.attribute.score(images, prompts)
        spa = self.spatial.score(images, prompts)
        act = self.action.score(images, [self.strip_adjectives(p) for p in prompts])
        return torch.stack([three_in_one(self.subtype(p), att[i], spa[i], act[i]) for i, p in enumerate(prompts)])

    def info(self) -> dict[str, Any]:
        how = ("spaCy ADJ tokens removed (exact)" if is_exact(self.noun_phrases)
               else "adjectives removed by a word list (a PROXY for spaCy's ADJ tags)")
        return {"kind": "t2i_complex", "attribute": self.attribute.name, "spatial": self.spatial.name,
                "action": self.action.name, "noun_phrases": self.noun_phrases, "exact": False, "scale": "0-1",
                "reference": "T2I-CompBench 3_in_1_eval/3_in_1.py",
                "note": f"PROXY: its spatial component is the open-vocabulary detector standing in for UniDet; "
                        f"action prompts: {how}"}


@register("t2i_complex")
def _build(cfg: ScorerConfig, *, others: dict[str, Scorer] | None = None, **_: Any) -> Scorer:
    others = others or {}
    names = {"attribute": cfg.attribute, "spatial": cfg.spatial, "action": cfg.action}
    missing = [f"{role}={n}" for role, n in names.items() if n not in others]
    if missing:
        raise ConfigError(
            f"t2i_complex '{cfg.name or 't2i_complex'}' combines scorers that are not in the scorer list before it: "
            f"{', '.join(missing)} (available: {sorted(others)})"
        )
    if not cfg.subset_dir:
        raise ConfigError("t2i_complex: set subset_dir to the T2I-CompBench dataset dir (complex_val_*.txt)")
    return ComplexScorer(others[cfg.attribute], others[cfg.spatial], others[cfg.action],
                         complex_subtypes(cfg.subset_dir), cfg.name or "complex_3in1", cfg.noun_phrases)


@register_check("t2i_complex")
def _check(cfg: ScorerConfig, key: str, problems: Problems, *, earlier: Sequence[str] = (), **_: Any) -> None:
    names = {"attribute": cfg.attribute, "spatial": cfg.spatial, "action": cfg.action}
    missing = [f"{role}={n}" for role, n in names.items() if n not in earlier]
    if missing:
        problems.add(f"{key}: t2i_complex combines scorers that are not in the scorer list before it: "
                     f"{', '.join(missing)} (listed before it: {list(earlier)})")
    if not cfg.subset_dir:
        problems.add(f"{key}.subset_dir: not set; point it at T2I-CompBench's dataset dir (complex_val_*.txt)")
    else:
        problems.check(complex_subtypes, cfg.subset_dir, where=f"{key}.subset_dir")
    problems.check(adjective_stripper, cfg.noun_phrases, where=f"{key}.noun_phrases")
