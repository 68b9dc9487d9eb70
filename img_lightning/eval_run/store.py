"""Where generated images live: deterministic names, atomic writes and JSONL metadata.

The generate stage writes through :class:`ImageStore`; the score and report stages read through it.

``{run}/images/{arm}/{uid}.png``; metadata lines go to ``{run}/metadata/{arm}.{chunk}.jsonl`` (one
file per array task, so concurrent tasks never append to the same file). An image counts as done
when its file exists AND a metadata line names it, so a task killed between the two simply redoes
that image. Whether a done image still matches the current config is checked once per call, before
any stage, by :func:`img_lightning.generation.provenance.check_stored_images`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from ..atomic import append_jsonl, atomic_path

log = logging.getLogger(__name__)


def is_constant(image: Image.Image) -> bool:
    """Whether every pixel of ``image`` has the same value (per channel)."""
    extrema = image.getextrema()
    bands = extrema if isinstance(extrema[0], tuple) else (extrema,)
    return all(low == high for low, high in bands)


def constant_images(records: dict[str, dict[str, Any]]) -> list[str]:
    """Uids whose metadata flags a constant image."""
    return sorted(u for u, rec in records.items() if rec.get("constant_image"))


def safe_uid(uid: str) -> str:
    """Uids become file names; keep them portable."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in uid)


class ImageStore:
    def __init__(self, run_dir: str | Path, arm: str, chunk_tag: str = "0of1", image_format: str = "png") -> None:
        self.run_dir = Path(run_dir)
        self.arm = arm
        self.dir = self.run_dir / "images" / arm
        self.meta_dir = self.run_dir / "metadata"
        self.meta_file = self.meta_dir / f"{arm}.{chunk_tag}.jsonl"
        self.ext = image_format.lower()
        self._done: dict[str, dict[str, Any]] | None = None

    def path_for(self, uid: str) -> Path:
        return self.dir / f"{safe_uid(uid)}.{self.ext}"

    def records(self) -> dict[str, dict[str, Any]]:
        """uid -> last metadata line, over every chunk's file of this arm."""
        out: dict[str, dict[str, Any]] = {}
        for f in sorted(self.meta_dir.glob(f"{self.arm}.*.jsonl")):
            for line in f.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill: that image is redone
                out[rec["uid"]] = rec
        return out

    def done(self) -> dict[str, dict[str, Any]]:
        if self._done is None:
            self._done = {u: r for u, r in self.records().items() if self.path_for(u).is_file()}
        return self._done

    def pending(self, uids: Iterable[str]) -> list[str]:
        done = self.done()
        return [u for u in uids if u not in done]

    def save(self, uid: str, image: Image.Image, meta: dict[str, Any]) -> Path:
        path = self.path_for(uid)
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG" if self.ext == "png" else self.ext.upper())
        return self._record(uid, image, meta)

    def save_copy(self, uid: str, source: Path, meta: dict[str, Any]) -> Path:
        """``source``'s bytes as this arm's image of ``uid`` (an arm whose settings equal another's
        reuses its images instead of generating copies of them)."""
        with atomic_path(self.path_for(uid)) as tmp:
            shutil.copyfile(source, tmp)
        with Image.open(source) as image:
            return self._record(uid, image, meta)

    def _record(self, uid: str, image: Image.Image, meta: dict[str, Any]) -> Path:
        """The metadata line that makes the image written to :meth:`path_for` count as done."""
        path = self.path_for(uid)
        rec = {"uid": uid, "arm": self.arm, "file": str(path.relative_to(self.run_dir)), **meta}
        if is_constant(image):  # all black (a NaN latent decodes to that) or any single colour
            rec["constant_image"] = True
            log.warning("%s/%s: every pixel has the same value; it is kept, flagged in its metadata and the report",
                        self.arm, uid)
        append_jsonl(self.meta_file, [rec])
        self.done()[uid] = rec
        return path

    def load(self, uid: str) -> Image.Image:
        with Image.open(self.path_for(uid)) as im:
            return im.convert("RGB")
