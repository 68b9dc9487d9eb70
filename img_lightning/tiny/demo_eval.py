"""A few prompts through the evaluation pipeline (``img-eval all``) on the tiny models: the end of
``img-demo`` and of the end-to-end test. Every model is local; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

from ..config.loading import resolve_config_path

DEMO_CONFIG = resolve_config_path("configs/eval/demo.yaml")
DEMO_RECIPE = resolve_config_path("configs/preprocess/demo.yaml")


def tiny_eval_overrides(
    run_dir: str | Path,
    sdxl_dir: str | Path,
    ip_adapter_dir: str | Path,
    llava_dir: str | Path,
    aligner_path: str | Path,
    scorer_dirs: Mapping[str, Path],
    prompts_path: str | Path,
    limit: int = 4,
    grader_dir: Optional[str | Path] = None,
) -> list[str]:
    """``key=value`` overrides that point configs/eval/demo.yaml at the tiny models (the MLLM grader
    reads ``grader_dir``, by default the guidance MLLM)."""
    s = scorer_dirs
    return [
        f"run_dir={run_dir}",
        f"prompts.path={prompts_path}",
        f"prompts.limit={limit}",
        f"generation.pipeline.path={sdxl_dir}",
        f"img.ip_adapter.path={ip_adapter_dir}",
        f"encoders.ip.image_encoder_path={ip_adapter_dir}",
        f"encoders.ip.adapter_path={ip_adapter_dir}",
        f"encoders.mllm.path={llava_dir}",
        f"img.aligner.checkpoint={aligner_path}",
        f"scorers.0.checkpoint={s['hps_checkpoint']}",
        f"scorers.0.model_config={s['hps_model_config']}",
        f"scorers.1.path={s['clip']}",
        f"scorers.1.processor_path={s['clip']}",
        f"scorers.2.path={s['blip_vqa']}",
        f"scorers.3.path={s['clip']}",
        f"scorers.3.checkpoint={s['aesthetic_mlp']}",
        f"scorers.4.checkpoint={s['image_reward_checkpoint']}",
        f"scorers.4.processor_path={s['image_reward_tokenizer']}",
        f"scorers.5.mllm.path={grader_dir or llava_dir}",
    ]


def run_demo_eval(
    out_dir: str | Path,
    sdxl_dir: str | Path,
    ip_adapter_dir: str | Path,
    llava_dir: str | Path,
    aligner_path: str | Path,
    prompts_path: str | Path,
    limit: int = 4,
    scorer_dirs: Optional[Mapping[str, Path]] = None,
    recipe: Optional[str | Path] = DEMO_RECIPE,
    extra: Sequence[str] = (),
    progress: bool = True,
    grader_dir: Optional[str | Path] = None,
) -> Path:
    """Generate (base, control, IMG), score and report ``limit`` prompts of a T2I-CompBench-style
    text file; builds the tiny scorers under ``out_dir/tiny_scorers`` unless given. Returns the
    report's index.html."""
    from ..evaluation.pipeline import run
    from .scorers import build_tiny_scorers

    out = Path(out_dir)
    if scorer_dirs is None:
        scorer_dirs = build_tiny_scorers(out / "tiny_scorers")
    args = [str(DEMO_CONFIG), *tiny_eval_overrides(out / "eval", sdxl_dir, ip_adapter_dir, llava_dir, aligner_path,
                                                   scorer_dirs, prompts_path, limit, grader_dir)]
    if recipe is not None:
        args.append(f"recipe={recipe}")
    html = run("all", [*args, *extra], progress=progress)
    assert html is not None
    return html
