"""The manifest of a finetuned-MLLM export, and what other stages read from it.

An export folder (``img-finetune-mllm`` writes it) is a plain llava-hf / Qwen2.5-VL folder plus
``img_finetune.json``: the base model, the data fingerprint, the question file's hash, the
conversation format, the recipe, the steps trained and the sha256 of every weight file. The sha256
of that manifest is the export's identity: the preprocessing cache key includes it whenever
``encoders.mllm.path`` points at an export, so two exports made from the same config (another
seed, more steps) never share a cache.

The cache key trusts the manifest; :func:`verify_export_weights` makes that trust earned: before
an export's features are computed (``img-preprocess``, ``img-eval``, ``img-finetune-mllm eval``)
every weight file is compared with the manifest's list (present, nothing unlisted, size, sha256:
once per process and file version), so weights replaced behind an unchanged manifest are refused
instead of being cached under the old export's key.

Kept free of heavy imports: config loading (cache keys) uses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

from ..config.encoders import MLLMConfig
from ..errors import UserError

MANIFEST_NAME = "img_finetune.json"
MANIFEST_FORMAT = "img-lightning/finetuned-mllm"
MANIFEST_VERSION = 1

log = logging.getLogger(__name__)


class ExportManifestError(UserError, ValueError):
    """An export folder whose manifest cannot be read; the message names the file."""


def manifest_path(folder: str | Path) -> Path:
    return Path(folder).expanduser() / MANIFEST_NAME


def read_manifest(folder: str | Path) -> Optional[dict]:
    """The manifest of an export folder, or None when the folder is not an export."""
    path = manifest_path(folder)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportManifestError(f"{path} is not valid JSON ({err}); re-export the model with "
                                  f"img-finetune-mllm export") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ExportManifestError(f"{path} is not an img-finetune-mllm manifest (format {MANIFEST_FORMAT!r})")
    return data


def export_identity(folder: str | Path) -> Optional[str]:
    """sha256 of the folder's manifest (which holds the sha256 of every weight file), or None."""
    path = manifest_path(folder)
    if not path.is_file():
        return None
    read_manifest(folder)  # refuse a damaged manifest rather than hash it
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ExportWeightsChanged(ExportManifestError):
    """An export's weight files are not the ones its manifest lists."""


def verify_export_weights(folder: str | Path) -> None:
    """Refuse an export folder whose weight files differ from its manifest (nothing to check in a
    folder without one)."""
    from ..hashing import files_sha256

    folder = Path(folder).expanduser()
    manifest = read_manifest(folder)
    if manifest is None:
        return
    listed: dict = manifest.get("weights") or {}
    sizes: dict = manifest.get("weight_sizes") or {}
    problems = [f"{n} is not listed" for n in sorted(p.name for p in folder.glob("*.safetensors")) if n not in listed]
    present = [folder / n for n in sorted(listed) if (folder / n).is_file()]
    problems += [f"{n} is missing" for n in sorted(listed) if not (folder / n).is_file()]
    problems += [f"{p.name} has {p.stat().st_size} bytes, the manifest says {sizes[p.name]}" for p in present
                 if p.name in sizes and p.stat().st_size != sizes[p.name]]
    if not problems:
        hashes = files_sha256(present)
        problems += [f"{p.name} has sha256 {hashes[p][:16]}..., the manifest says {str(listed[p.name])[:16]}..."
                     for p in present if hashes[p] != listed[p.name]]
    if problems:
        raise ExportWeightsChanged(
            f"{folder}: the weights are not the ones its manifest {MANIFEST_NAME} lists ({'; '.join(problems)}). Its "
            f"cache key and provenance would describe other weights: re-export the checkpoint (img-finetune-mllm "
            f"export) rather than replacing files in an export")


def export_folder_of(mllm_cfg: MLLMConfig) -> Optional[Path]:
    """The local folder an ``encoders.mllm`` block loads from, if it is a local one (``path``, or a
    ``model`` that is a directory); None for hub ids and unset (``???``) paths."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(mllm_cfg, DictConfig) and OmegaConf.is_missing(mllm_cfg, "path"):
        return None
    path = getattr(mllm_cfg, "path", None)
    if path:
        return Path(str(path)).expanduser()
    model = Path(str(getattr(mllm_cfg, "model", ""))).expanduser()
    return model if str(model) and model.is_dir() else None


def export_recipe(mllm_cfg: MLLMConfig) -> dict:
    """The cache-key part of a finetuned export: ``{"finetuned_export_sha256": ...}`` when the MLLM
    folder holds a manifest, else nothing (so the keys of every other recipe stay as they were)."""
    folder = export_folder_of(mllm_cfg)
    identity = export_identity(folder) if folder is not None else None
    return {"finetuned_export_sha256": identity} if identity else {}


def training_mismatches(manifest: dict, mllm_cfg: MLLMConfig) -> list[str]:
    """Where an ``encoders.mllm`` block reads an export differently from how it was trained
    (conversation format, image preprocessing, question file): ``["key: trained X, now Y"]``."""
    from ..encoders.conversation import resolve_format
    from ..encoders.questions import question_set_from_config

    trained = manifest.get("conversation", {})
    now = {
        "prompt_format": resolve_format(mllm_cfg.prompt_format, str(mllm_cfg.backend)).value,
        "image_mode": str(mllm_cfg.image_mode),
    }
    out = [f"{k}: trained with {trained[k]!r}, now {v!r}" for k, v in now.items() if k in trained and trained[k] != v]
    trained_q = manifest.get("questions", {})
    if trained_q.get("sha256"):
        now_q = question_set_from_config(mllm_cfg)
        if now_q.sha256 != trained_q["sha256"]:
            out.append(f"questions: trained with {trained_q.get('name')!r} (sha256 {trained_q['sha256'][:12]}...), "
                       f"now {now_q.name!r} (sha256 {now_q.sha256[:12]}...)")
    return out


def warn_if_trained_otherwise(mllm_cfg: MLLMConfig, folder: str | Path) -> None:
    """Log a warning when the MLLM folder is an export trained with another conversation format,
    image preprocessing or question file than ``mllm_cfg`` asks it with (allowed: an ablation may
    want it, but it is rarely meant)."""
    manifest = read_manifest(folder)
    if manifest is None:
        return
    for line in training_mismatches(manifest, mllm_cfg):
        log.warning("%s is a finetuned export read differently from how it was trained: %s", folder, line)
