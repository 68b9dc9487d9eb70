"""What ``img-generate`` writes: each prompt's images, a side-by-side strip and ``metadata.jsonl``.

``OUT/{stem}_base.png`` (or ``_given.png``: the image IMG refined), ``OUT/{stem}_img_r{r}.png``,
``OUT/{stem}_strip.png``, with ``stem`` = ``{n:03d}-{prompt words}-s{seed}``; ``OUT/metadata.jsonl``
gets one line per image: its file, arm and the provenance fields ``img-eval`` records (prompt, seed,
backbone, sampler, the arm's settings, the aligner checkpoint's sha256, the question asked). Images
are written atomically; a second run into the same folder adds files under new stems and lines to
``metadata.jsonl``, never replacing what is there.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic import append_jsonl, atomic_path
from .refiner import Refinement

METADATA = "metadata.jsonl"


def _slug(text: str, words: int = 6) -> str:
    return "-".join(re.findall(r"[a-z0-9]+", text.lower())[:words]) or "prompt"


def _free_stem(out: Path, stem: str) -> str:
    """``stem``, or ``stem-2``, ``stem-3``... when files of that stem are already there."""
    taken = {p.name.split("_", 1)[0] for p in out.glob("*.png")}
    n, candidate = 1, stem
    while candidate in taken:
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def _save(image: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def write_refinements(results: Sequence[Refinement], out_dir: str | Path) -> list[Path]:
    """Write every result into ``out_dir``; returns the strips' paths, in order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    strips = []
    for n, res in enumerate(results):
        stem = _free_stem(out, f"{n:03d}-{_slug(res.prompt)}-s{res.seed}")
        strip = out / f"{stem}_strip.png"
        lines = []
        for (arm, image), rec in zip(res.images(), res.records, strict=True):
            name = f"{stem}_{'given' if rec.get('pixels_sha256') else arm}.png"
            _save(image, out / name)
            lines.append({"uid": stem, "file": name, "strip": strip.name, **rec})
        _save(res.strip(), strip)
        append_jsonl(out / METADATA, lines)  # after the images: a line always names a file on disk
        strips.append(strip)
    return strips
