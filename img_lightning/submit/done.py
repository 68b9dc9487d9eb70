"""Is a stage's output already there and sound? Each check returns why it is done, or None.

``img-submit`` skips a stage that is done, so submitting a pipeline again after a failure
resumes it; a stage after one that runs again is never skipped (its output would be stale).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ..encoders.export_manifest import ExportManifestError, read_manifest, verify_export_weights
from ..hashing import file_sha256


def _json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def mllm_export_done(folder: Path) -> Optional[str]:
    """An ``img-finetune-mllm`` export whose weight files match the sha256 in its manifest."""
    try:
        manifest = read_manifest(folder)
        if manifest is None or not manifest.get("weights"):
            return None
        verify_export_weights(folder)  # listed, present, size, sha256 (hashed in parallel, once per process)
    except ExportManifestError:  # ExportWeightsChanged included
        return None
    weights = manifest["weights"]
    step = manifest.get("training", {}).get("global_step")
    return f"export of step {step}, {len(weights)} weight file(s) match their sha256"


def converted_done(folder: Path) -> Optional[str]:
    """An ``img-convert-llava`` folder (written atomically, with its conversion.json last)."""
    record = _json(folder / "conversion.json")
    return "converted (conversion.json)" if isinstance(record, dict) else None


def mllm_folder_ready(folder: Path) -> Optional[str]:
    return "given" if (folder / "config.json").is_file() else None


def cache_done(cache: Path) -> Optional[str]:
    """manifest.json written and verify.json saying every shard checked out, for that manifest."""
    manifest, verified = _json(cache / "manifest.json"), _json(cache / "verify.json")
    if not isinstance(manifest, dict) or not isinstance(verified, dict) or verified.get("ok") is not True:
        return None
    shards = len(manifest.get("shards", []))
    if verified.get("cache_key") != manifest.get("cache_key") or verified.get("shards") != shards:
        return None
    return (f"{verified.get('samples')} samples in {verified.get('shards')} shards, verified "
            f"(cache key {verified['cache_key']})")


def train_done(run_dir: Path, cache: Path) -> Optional[str]:
    """The run's export, made from this cache (its key recorded in aligner.json)."""
    info = _json(run_dir / "export" / "aligner.json")
    manifest = _json(cache / "manifest.json")
    exported = (run_dir / "export" / "aligner.pth").is_file()
    if not isinstance(info, dict) or not exported or not isinstance(manifest, dict):
        return None
    if info.get("cache_key") != manifest.get("cache_key"):
        return None
    return f"aligner exported at step {info.get('global_step')}"


def eval_done(eval_dir: Path, aligner: Path) -> Optional[str]:
    """A report of this aligner (report.json names it; index.html is written last)."""
    report = _json(eval_dir / "report" / "report.json")
    if not isinstance(report, dict) or not (eval_dir / "report" / "index.html").is_file():
        return None
    settings = report.get("img_settings", {})
    if str(settings.get("aligner")) != str(aligner):
        return None
    if not aligner.is_file() or settings.get("aligner_sha256") != file_sha256(aligner):
        return None  # the aligner at that path was retrained since the report
    return f"report of {report.get('num_prompts')} prompts"
