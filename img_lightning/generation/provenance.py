"""What an image of a run was made from, and the check that a reused run directory still matches.

Every stored image's metadata line records what made it (prompt text, seed, backbone, sampler,
arm settings, the aligner checkpoint's sha256). A run directory reused with another config (another
prompt file with the same uids, another aligner, another IP scale) would otherwise be "resumed":
the old images skipped as done, scored and reported under the new config. :func:`check_stored_images`
compares each stored image of the current prompt set with what the current config would generate
and refuses, naming the run directory, the uid and the differing fields.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from ..config.eval import EvalConfig
from ..config.loading import ConfigError
from ..eval_run import ImageStore, PromptRecord, arm_names, source_arm
from ..hashing import file_sha256_once
from .seeds import seed_for

_ABSENT = "<not recorded>"


class StaleRunError(ConfigError):
    """The run directory holds images made with another config than the current one."""


def _name(value: Any) -> str:
    return value.value if hasattr(value, "value") else value


def aligner_sha256(cfg: EvalConfig) -> Optional[str]:
    path = Path(str(cfg.img.aligner.checkpoint)).expanduser()
    return file_sha256_once(path) if path.is_file() else None


def common_meta(cfg: EvalConfig, text: str, seed: int) -> dict[str, Any]:
    """The fields every arm's image records: prompt, seed, backbone and sampler."""
    g = cfg.generation
    s = g.sampler
    meta = {
        "prompt": text, "seed": int(seed), "pipeline": _name(g.pipeline.kind),
        "model": g.pipeline.model, "unet": g.pipeline.unet, "dtype": _name(g.pipeline.dtype), "steps": s.steps,
        "guidance_scale": s.guidance_scale, "height": s.height, "width": s.width,
    }
    if _name(g.pipeline.kind) == "flux":
        meta.update(true_cfg_scale=s.true_cfg_scale, true_cfg_start_step=s.true_cfg_start_step, shift=_name(s.shift))
    return meta


def regen_meta(cfg: EvalConfig, ip_scale: float) -> dict[str, Any]:
    """The re-generation settings (IMG rounds and control)."""
    img = cfg.img
    neg_scale = ip_scale if img.negative_ip_scale is None else img.negative_ip_scale
    ip = img.ip_adapter
    return {"negative_prompt": img.negative_prompt, "ip_scale": ip_scale,
            "negative_ip_image": _name(img.negative_ip_image), "negative_ip_scale": neg_scale,
            "ip_adapter": f"{ip.model}/{ip.subfolder}/{ip.weight_name}"}


def same_images_as(cfg: EvalConfig, arm: str) -> Optional[str]:
    """The arm whose images ``arm``'s are by construction, or None. The control arm is the base
    image again when the re-generation's negative prompt is the base image's and its negative pass
    has IP scale 0 too (SDXL: always, one scale for both CFG halves; FLUX: ``negative_ip_scale``
    null or 0): at IP scale 0 in every pass the adapter adds exactly nothing (tested bit for bit),
    and prompt, seed, pipeline and sampler are shared by every arm. With the released SDXL settings
    it is; FLUX's control keeps the black negative IP image at 0.2 and differs."""
    if arm != "control":
        return None
    img = cfg.img
    negative_scale = 0.0 if img.negative_ip_scale is None else float(img.negative_ip_scale)
    if img.negative_prompt == cfg.generation.base.negative_prompt and negative_scale == 0.0:
        return "base"
    return None


def img_meta(cfg: EvalConfig, round_index: int, aligner_hash: Optional[str]) -> dict[str, Any]:
    """The settings of IMG round ``round_index`` (on top of :func:`regen_meta`)."""
    return {**regen_meta(cfg, cfg.img.ip_scale), "round": round_index,
            "source_arm": source_arm(round_index),
            "passes": cfg.img.aligner.passes, "aligner": str(cfg.img.aligner.checkpoint),
            "aligner_sha256": aligner_hash}


def expected_meta(cfg: EvalConfig, arm: str, prompt: PromptRecord, aligner_hash: Optional[str]) -> dict[str, Any]:
    """The metadata the current config gives ``prompt``'s image in ``arm``."""
    meta = common_meta(cfg, prompt.text, seed_for(prompt.uid, cfg.generation.seed))
    if arm == "base":
        meta.update(negative_prompt=cfg.generation.base.negative_prompt, ip_scale=None)
    elif arm == "control":
        meta.update(regen_meta(cfg, 0.0))
    else:
        meta.update(img_meta(cfg, int(arm.removeprefix("img_r")), aligner_hash))
    return json.loads(json.dumps(meta))  # enums and tuples as JSON has them on disk


# Fields that only say where a file is, not what made the image.
_WHERE_ONLY = ("aligner",)


def differences(stored: dict[str, Any], expected: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (stored.get(k, _ABSENT), v) for k, v in expected.items()
            if k not in _WHERE_ONLY and stored.get(k, _ABSENT) != v}


def check_stored_images(cfg: EvalConfig, prompts: Sequence[PromptRecord], run_dir: str | Path) -> None:
    """Refuse a run directory whose stored images of ``prompts`` were made with another config."""
    run_dir = Path(run_dir)
    if not (run_dir / "metadata").is_dir():
        return
    by_uid = {p.uid: p for p in prompts}
    aligner_hash: Optional[str] = None
    stale: list[tuple[str, str, dict]] = []
    for arm in arm_names(cfg.img.rounds, cfg.img.control):
        done = ImageStore(run_dir, arm, "0of1", cfg.generation.image_format).done()
        for uid in sorted(u for u in done if u in by_uid):
            if arm.startswith("img_r") and aligner_hash is None:
                aligner_hash = aligner_sha256(cfg)
            expected = expected_meta(cfg, arm, by_uid[uid], aligner_hash)
            if expected.get("aligner_sha256", "") is None:
                del expected["aligner_sha256"]  # the file is not here (a report on another machine): cannot compare
            diff = differences(done[uid], expected)
            if diff:
                stale.append((arm, uid, diff))
    if stale:
        arm, uid, diff = stale[0]
        fields = "; ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise StaleRunError(
            f"{run_dir}: {len(stale)} stored image(s) were made with another config than the current one; the "
            f"first, {arm}/{uid}: {fields}. They would be skipped as done and reported under this config. Use a "
            f"new run_dir, or delete the stale images ({run_dir / 'images'}/ARM/UID.*) and the run's metadata "
            f"({run_dir / 'metadata'}) to regenerate them."
        )
