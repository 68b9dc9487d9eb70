"""Question sets: which question the MLLM is asked about an image, for every sample.

Two sources, one interface (:class:`QuestionSet`):

* a **question file** (``encoders.mllm.questions: PATH``): a JSON list of strings, each containing
  ``{prompt}`` exactly once, e.g. the released IMG question file ``assets/edit_instructions.json``
  that the released aligners were trained with. The file's sha256 is part of the cache key, so a
  cache made with another file is refused. ``{prompt}`` is replaced by the prompt as given (plain
  string replacement, no stripping), as the released inference code does.
* a **built-in set** (``encoders.mllm.templates``, only ``img-v1``: our own paraphrases, kept for the
  demo and the tests; the prompt is stripped, as before).

The question of a sample is chosen from its id with a stable hash
(``sha256(salt + ":" + id) mod n``; the salt is the set name or the file's sha256), so every run,
machine and process picks the same one. Preprocessing, evaluation and the MLLM finetuning stage all
choose through :meth:`QuestionSet.index_for`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config.encoders import MLLMConfig
from ..config.loading import ConfigError
from .templates import TEMPLATE_SETS, templates

PLACEHOLDER = "{prompt}"
IMAGE_MARKER = "<image>"  # LLaVA's image placeholder: never allowed inside a question


class QuestionFileError(ConfigError):
    """A question file that cannot be used; the message names the file and the bad entry."""


@dataclass(frozen=True)
class QuestionSet:
    name: str  # built-in set name, or the question file's name
    questions: tuple[str, ...]
    sha256: str  # of the file's bytes (file) or of the canonical JSON list (built-in)
    salt: str  # hashed with the sample id to choose the question
    strip_prompt: bool  # built-in sets strip the prompt; question files use it as given
    path: Optional[str] = None  # the question file (None for a built-in set)

    def __len__(self) -> int:
        return len(self.questions)

    def index_for(self, key: str) -> int:
        """Deterministic question index of a sample: ``sha256(salt:key) mod len(set)``."""
        digest = hashlib.sha256(f"{self.salt}:{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") % len(self.questions)

    def question(self, prompt: str, index: int) -> str:
        """The question about an image generated for ``prompt``."""
        if not 0 <= index < len(self.questions):
            raise ValueError(f"question index {index} out of range for {self.name!r} ({len(self.questions)} questions)")
        text = prompt.strip() if self.strip_prompt else prompt
        # str.replace, not str.format: prompts may contain braces.
        return self.questions[index].replace(PLACEHOLDER, text)


def builtin_question_set(name: str = "img-v1") -> QuestionSet:
    items = templates(name)
    canonical = json.dumps(list(items), ensure_ascii=True, separators=(",", ":"))
    return QuestionSet(name=name, questions=items, sha256=hashlib.sha256(canonical.encode("ascii")).hexdigest(),
                       salt=name, strip_prompt=True)


def load_question_file(path: str | Path) -> QuestionSet:
    """Read and validate a question file; any problem is one :class:`QuestionFileError`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise QuestionFileError(f"question file {path} does not exist (encoders.mllm.questions); download it "
                                f"with the model weights (see README) or point the key at your own file")
    raw = path.read_bytes()
    try:
        items = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QuestionFileError(f"question file {path} is not UTF-8 JSON: {err}") from None
    if not isinstance(items, list) or not items:
        raise QuestionFileError(f"question file {path} must hold a non-empty JSON list of strings, "
                                f"got {type(items).__name__}{' (empty)' if items == [] else ''}")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise QuestionFileError(f"question file {path}: entry {i} is a {type(item).__name__}, not a string")
        count = item.count(PLACEHOLDER)
        if count != 1:
            raise QuestionFileError(f"question file {path}: entry {i} ({item[:80]!r}) contains {PLACEHOLDER} "
                                    f"{count} times; every question needs it exactly once")
        if IMAGE_MARKER in item:
            raise QuestionFileError(f"question file {path}: entry {i} ({item[:80]!r}) contains {IMAGE_MARKER}, "
                                    f"the MLLM's image placeholder; the conversation format adds the image itself")
    sha = hashlib.sha256(raw).hexdigest()
    return QuestionSet(name=path.name, questions=tuple(items), sha256=sha, salt=sha, strip_prompt=False,
                       path=str(path))


def _questions_path(mllm_cfg: MLLMConfig) -> Optional[str]:
    """``encoders.mllm.questions``, with a clear error when a recipe left it as ``???``."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(mllm_cfg, DictConfig) and OmegaConf.is_missing(mllm_cfg, "questions"):
        raise ConfigError("encoders.mllm.questions is not set: give the question file the recipe needs "
                          "(the released assets/edit_instructions.json, see README), e.g. "
                          "encoders.mllm.questions=/models/IMG/edit_instructions.json (img-train: "
                          "'data.recipe_overrides=[encoders.mllm.questions=/models/IMG/edit_instructions.json]')")
    value = getattr(mllm_cfg, "questions", None)
    return str(value) if value else None


def question_set_from_config(mllm_cfg: MLLMConfig) -> QuestionSet:
    """The question set an ``encoders.mllm`` block asks for (the file wins over ``templates``)."""
    path = _questions_path(mllm_cfg)
    if path:
        return load_question_file(path)
    name = str(mllm_cfg.templates)
    if name not in TEMPLATE_SETS:
        raise ConfigError(f"encoders.mllm.templates={name!r} is not a built-in question set; "
                          f"use one of {sorted(TEMPLATE_SETS)} or set encoders.mllm.questions=PATH")
    return builtin_question_set(name)


def question_recipe(mllm_cfg: MLLMConfig) -> dict:
    """The cache-key part of the question choice: the built-in set's name or the file's sha256."""
    path = _questions_path(mllm_cfg)
    if path:
        return {"templates": None, "questions_sha256": load_question_file(path).sha256}
    return {"templates": str(mllm_cfg.templates), "questions_sha256": None}
