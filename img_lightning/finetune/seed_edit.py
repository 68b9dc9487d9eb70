"""Reader of a user-supplied SEED-Data-Edit sample (the paper tests its MLLM on 300 such cases).

SEED-Data-Edit (``AILab-CVC/SEED-Data-Edit-Part1-*``, ``-Part2-3``) ships images in tar archives
and JSON-lines annotations that differ between its parts (single edits name a source image and an
instruction; the multi-turn part numbers them, ``source_image``, ``instruction_1``,
``edit_image_1``, ...), and none of them carries the *target prompt* the misalignment question is
built from. So the evaluation reads a sample file the user assembles: ``.jsonl`` (one JSON object
per line) or ``.json`` (a list of objects), one case per object, with

* the source image - ``source_image`` (aliases ``input_image``, ``image``, ``original_image``): a
  path, absolute or relative to ``eval.image_root`` (default: the file's folder);
* the target prompt T1 - ``target_prompt`` (aliases ``target_caption``, ``edited_prompt``,
  ``output_caption``): what the image should show;
* the reference instruction TE - ``instruction`` (aliases ``edit_instruction``, ``edit_prompt``,
  ``instruction_1``: the first turn of a multi-turn record);
* optionally an id - ``id`` (aliases ``key``, ``image_id``); default: the line number.

A case whose image is missing or does not decode is counted and skipped; a case without one of the
required fields is an error naming the line and the fields expected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError

IMAGE_FIELDS = ("source_image", "input_image", "image", "original_image")
PROMPT_FIELDS = ("target_prompt", "target_caption", "edited_prompt", "output_caption")
INSTRUCTION_FIELDS = ("instruction", "edit_instruction", "edit_prompt", "instruction_1")
ID_FIELDS = ("id", "key", "image_id")


class SeedEditFormatError(UserError, ValueError):
    """A sample file that is not readable as SEED-Data-Edit cases; names the file and line."""


@dataclass
class EvalCase:
    """One evaluation case: the image, the prompt it should match, the reference instruction."""

    key: str
    image: Any  # PIL image (RGB)
    prompt: str
    reference: str
    original_prompt: str = ""
    source: str = ""  # where it came from (file:line, parquet row)
    extra: dict = field(default_factory=dict)


def _pick(record: dict, names: tuple[str, ...]) -> Optional[Any]:
    for name in names:
        value = record.get(name)
        if value not in (None, ""):
            return value
    return None


def _records(path: Path) -> list[tuple[int, Any]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SeedEditFormatError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, list):
            raise SeedEditFormatError(f"{path}: a .json sample must be a list of objects (one per case)")
        return list(enumerate(data, 1))
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((n, json.loads(line)))
            except json.JSONDecodeError as err:
                raise SeedEditFormatError(f"{path}:{n}: not a JSON object ({err})") from None
    return out


def read_seed_edit_sample(path: str | Path, image_root: Optional[str | Path] = None,
                          limit: Optional[int] = None) -> tuple[list[EvalCase], dict[str, int]]:
    """The cases of a sample file, in file order (at most ``limit``), and the skip counts."""
    from .triplets import CorruptImage, decode_image

    path = Path(path).expanduser()
    if not path.is_file():
        raise SeedEditFormatError(f"eval.input={path}: no such file (a .jsonl or .json SEED-Data-Edit sample; see "
                                  f"docs/finetune-mllm.md, 'Evaluation')")
    root = Path(image_root).expanduser() if image_root else path.parent
    cases: list[EvalCase] = []
    skipped = {"missing_image": 0, "corrupt_image": 0}
    for line, record in _records(path):
        if limit is not None and len(cases) >= limit:
            break
        if not isinstance(record, dict):
            raise SeedEditFormatError(f"{path}:{line}: expected a JSON object, got {type(record).__name__}")
        image_ref, prompt, reference = (_pick(record, IMAGE_FIELDS), _pick(record, PROMPT_FIELDS),
                                        _pick(record, INSTRUCTION_FIELDS))
        missing = [what for what, value, names in (("source image", image_ref, IMAGE_FIELDS),
                                                   ("target prompt", prompt, PROMPT_FIELDS),
                                                   ("instruction", reference, INSTRUCTION_FIELDS)) if value is None]
        if missing:
            expected = "; ".join(f"{w}: one of {list(n)}" for w, n in (("source image", IMAGE_FIELDS),
                                                                        ("target prompt", PROMPT_FIELDS),
                                                                        ("instruction", INSTRUCTION_FIELDS)))
            raise SeedEditFormatError(f"{path}:{line}: no {', '.join(missing)} (fields present: {sorted(record)}). "
                                      f"Each case needs {expected}")
        image_path = Path(str(image_ref)).expanduser()
        image_path = image_path if image_path.is_absolute() else root / image_path
        if not image_path.is_file():
            skipped["missing_image"] += 1
            continue
        try:
            image = decode_image(image_path.read_bytes())
        except CorruptImage:
            skipped["corrupt_image"] += 1
            continue
        key = str(_pick(record, ID_FIELDS) or f"{path.name}:{line}")
        cases.append(EvalCase(key=key, image=image, prompt=str(prompt).strip(), reference=str(reference).strip(),
                              source=f"{path}:{line}", extra={"image": str(image_path)}))
    return cases, skipped
