"""The MLLM grader's rubric (a YAML file, versioned by its sha256) and the strict answer parser.

A rubric names its aspects, the overall key and the score range, and holds the question template
(``{prompt}`` is the image's prompt; literal braces are doubled, as in ``str.format``). The grader
must answer with one JSON object: every aspect -> a number or ``{"score": number, ...}``, and the
overall key -> a number, all within ``[0, scale]``. Anything else is unparseable: the parser says
why, and the image gets no score (never a default).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ...config.loading import ConfigError, load_config, resolve_config_path

DEFAULT_RUBRIC = "configs/eval/rubrics/diffusion_sharpening.yaml"  # a shipped config


@dataclass
class AspectSchema:
    key: str = "???"
    title: str = "???"


@dataclass
class RubricSchema:
    name: str = "???"
    scale: float = 10.0
    overall: str = "overall"
    aspects: list[AspectSchema] = field(default_factory=list)
    template: str = "???"


@dataclass(frozen=True)
class Rubric:
    name: str
    scale: float
    overall: str
    aspects: tuple[str, ...]
    template: str
    sha256: str
    path: str

    def question(self, prompt: str) -> str:
        return self.template.format(prompt=prompt)


def load_rubric(path: Optional[str | Path] = None) -> Rubric:
    """Read and check a rubric YAML (default: the Diffusion-Sharpening rubric shipped in configs)."""
    where = resolve_config_path(path or DEFAULT_RUBRIC)
    if not where.is_file():
        raise ConfigError(f"rubric file not found: {where}")
    cfg = load_config(RubricSchema, [where])
    aspects = tuple(a.key for a in cfg.aspects)
    if not aspects or len(set(aspects)) != len(aspects) or cfg.overall in aspects:
        raise ConfigError(f"{where}: aspects must be a non-empty list of distinct keys, none named '{cfg.overall}'")
    if not cfg.scale > 0:
        raise ConfigError(f"{where}: scale must be > 0")
    try:
        cfg.template.format(prompt="x")
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"{where}: template must use only {{prompt}} (double other braces): {err}") from None
    if "{prompt}" not in cfg.template:
        raise ConfigError(f"{where}: template has no {{prompt}} placeholder")
    return Rubric(cfg.name, float(cfg.scale), cfg.overall, aspects, cfg.template,
                  hashlib.sha256(where.read_bytes()).hexdigest(), str(where))


@dataclass
class Grade:
    """One parsed answer: ``overall`` on the rubric's scale, or None with ``error`` saying why."""

    overall: Optional[float] = None
    aspects: dict[str, float] = field(default_factory=dict)
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def _json_object(answer: str) -> dict[str, Any]:
    text = answer.strip()
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1).strip()
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object in the answer")
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON ({err.msg} at char {err.pos})") from None
    if not isinstance(obj, dict):
        raise ValueError("the JSON is not an object")
    return obj


def _number(value: Any, key: str, scale: float) -> float:
    if isinstance(value, dict):
        if "score" not in value:
            raise ValueError(f"'{key}' has no 'score'")
        value = value["score"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"'{key}' is not a number: {value!r}")
    v = float(value)
    if not math.isfinite(v) or not 0.0 <= v <= scale:
        raise ValueError(f"'{key}' = {value!r} is outside [0, {scale:g}]")
    return v


def parse_answer(answer: str, rubric: Rubric) -> Grade:
    """Strictly parse one grader answer (see the module docstring); never guesses a number."""
    try:
        obj = _json_object(answer)
        missing = [k for k in (*rubric.aspects, rubric.overall) if k not in obj]
        if missing:
            raise ValueError(f"missing keys {missing}")
        aspects = {k: _number(obj[k], k, rubric.scale) for k in rubric.aspects}
        return Grade(_number(obj[rubric.overall], rubric.overall, rubric.scale), aspects)
    except ValueError as err:
        return Grade(error=str(err))
