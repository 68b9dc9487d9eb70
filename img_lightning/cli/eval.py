"""``img-eval``: generate base / IMG / control images, score them, and write the report.

    img-eval generate CONFIG.yaml [more.yaml] [key=value ...] [--task-index I --num-tasks N]
    img-eval score    CONFIG.yaml [key=value ...] [--task-index I --num-tasks N]
    img-eval report   CONFIG.yaml [key=value ...]
    img-eval all      CONFIG.yaml [key=value ...]

Every stage is resumable: finished images and scores are skipped. Under a SLURM array each task
takes every N-th prompt (``--task-index $SLURM_ARRAY_TASK_ID --num-tasks $SLURM_ARRAY_TASK_COUNT``);
``report`` then merges all tasks' outputs (see slurm/eval.sbatch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import OmegaConf

from ..config.eval import EvalConfig
from .common import add_common_arguments, run_cli, setup_from_args
from ..config.loading import ConfigError, load_config, split_cli_args, to_container, to_yaml

STAGES = ("generate", "score", "report", "all")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="img-eval",
        description="Evaluate an IMG aligner: base vs IMG (vs control) images, scored with HPS v2, PickScore, "
        "CLIP and T2I-CompBench metrics, with win rates and bootstrap intervals.",
        epilog="Configs: configs/eval/*.yaml. Example: img-eval all configs/eval/sdxl_partiprompts.yaml "
        "run_dir=runs/eval/parti img.aligner.checkpoint=aligner_sdxl.pth",
    )
    p.add_argument("stage", choices=STAGES, help="generate | score | report | all (= the three in order)")
    p.add_argument("args", nargs="*", help="YAML config files and key=value overrides (applied in order)")
    p.add_argument("--task-index", type=int, default=None, help="this task's chunk (SLURM_ARRAY_TASK_ID)")
    p.add_argument("--num-tasks", type=int, default=None, help="number of chunks (SLURM_ARRAY_TASK_COUNT)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs of batch jobs)")
    add_common_arguments(p)
    return p


def resolve_config(args: Sequence[str], task_index: Optional[int] = None, num_tasks: Optional[int] = None) -> Any:
    """Schema <- YAML files <- overrides; then the recipe's encoders block (+ encoders.* overrides)."""
    files, overrides = split_cli_args(args)
    # OmegaConf's dotlist merge cannot index into lists (scorers.0.path=...): apply those afterwards.
    indexed = [o for o in overrides if any(part.isdigit() for part in o.split("=", 1)[0].split("."))]
    plain = [o for o in overrides if o not in indexed]
    cfg = load_config(EvalConfig, files, plain, require_complete=False)
    for o in indexed:
        key, value = o.split("=", 1)
        try:
            OmegaConf.update(cfg, key, yaml.safe_load(value) if value else None, merge=True)
        except Exception as err:
            raise ConfigError(f"command-line override '{o}': {err}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError("these config keys have no value (set them in a YAML file or as key=value): " + ", ".join(missing))
    if cfg.recipe:
        from ..config.preprocess import PreprocessConfig

        recipe = load_config(PreprocessConfig, [cfg.recipe], require_complete=False)
        cfg.encoders = recipe.encoders
        enc_overrides = [o for o in overrides if o.startswith("encoders.")]
        if enc_overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(enc_overrides))
    if task_index is not None:
        cfg.chunk.index = task_index
    if num_tasks is not None:
        cfg.chunk.count = num_tasks
    if not 0 <= cfg.chunk.index < cfg.chunk.count:
        raise ConfigError(f"chunk.index={cfg.chunk.index} must be in [0, chunk.count={cfg.chunk.count})")
    if cfg.img.rounds < 0 or cfg.img.aligner.passes < 1:
        raise ConfigError("img.rounds must be >= 0 and img.aligner.passes >= 1")
    return cfg


def load_prompt_set(cfg: Any) -> list:
    from ..evaluation.prompts import load_prompts

    p = cfg.prompts
    options = {"subset_dir": p.subset_dir} if p.format == "t2i_compbench" and p.subset_dir else {}
    return load_prompts(p.format, p.path, categories=list(p.categories), limit=p.limit, **options)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _tag(cfg: Any) -> str:
    return f"{cfg.chunk.index}of{cfg.chunk.count}"


def stage_generate(cfg: Any, prompts: list, run_dir: Path, progress: bool) -> dict[str, int]:
    from ..evaluation.prompts import chunk
    from ..generation.runner import GenerationRun

    mine = chunk(prompts, cfg.chunk.index, cfg.chunk.count)
    counts = GenerationRun(cfg, mine, run_dir, progress=progress).run()
    print(f"img-eval generate: {len(mine)} prompts in this task; new images: {counts}")
    return counts


def stage_score(cfg: Any, prompts: list, run_dir: Path, progress: bool) -> None:
    from ..evaluation.prompts import chunk
    from ..evaluation.scorers import build_scorers
    from ..evaluation.scoring import score_run
    from ..generation.runner import arm_names

    if not cfg.scorers:
        print("img-eval score: no scorers configured (scorers: [...]); nothing to do")
        return
    scorers = build_scorers(cfg.scorers)
    _write_text(run_dir / "scores" / "metrics.json", json.dumps({n: s.describe() for n, s in scorers.items()}, indent=2))
    mine = chunk(prompts, cfg.chunk.index, cfg.chunk.count)
    counts = score_run(cfg, mine, run_dir, arm_names(cfg.img.rounds, cfg.img.control), _tag(cfg), scorers, progress)
    print(f"img-eval score: new scores {counts}")


def stage_report(cfg: Any, prompts: list, run_dir: Path) -> Path:
    from ..evaluation.report import ReportInputs, write_report
    from ..evaluation.scoring import read_scores
    from ..evaluation.scorers import scorer_name
    from ..generation.runner import arm_names, img_arm
    from ..generation.store import ImageStore

    arms = arm_names(cfg.img.rounds, cfg.img.control)
    metrics_file = run_dir / "scores" / "metrics.json"
    described = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    names = [scorer_name(c) for c in cfg.scorers]
    scores = {a: {m: read_scores(run_dir, a, m) for m in names} for a in arms}
    images = {}
    for a in arms:
        store = ImageStore(run_dir, a, _tag(cfg), cfg.generation.image_format)
        images[a] = {u: str(store.path_for(u)) for u in store.done()}
    inputs = ReportInputs(
        prompts=prompts, scores=scores, images=images,
        metrics={m: described.get(m, {"name": m}) for m in names},
        img_arms=[img_arm(r) for r in range(1, cfg.img.rounds + 1)],
        title=f"IMG evaluation: {cfg.prompts.name} ({cfg.generation.pipeline.kind})",
        config=to_container(cfg),
        run_dir=run_dir,
    )
    r = cfg.report
    paths = write_report(inputs, run_dir / "report", r.bootstrap, r.seed, r.tie_tolerance, r.gallery_limit, r.thumb_size)
    print(f"img-eval report: {paths['html']}")
    return paths["html"]


def run(stage: str, args: Sequence[str], task_index: Optional[int] = None, num_tasks: Optional[int] = None,
        progress: bool = True) -> Optional[Path]:
    """Programmatic entry point (what ``main`` calls); returns the report's HTML path for report/all."""
    cfg = resolve_config(args, task_index, num_tasks)
    run_dir = Path(cfg.run_dir)
    prompts = load_prompt_set(cfg)
    if not prompts:
        raise ConfigError(f"no prompts left in {cfg.prompts.path} after categories/limit")
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_text(run_dir / "config.yaml", to_yaml(cfg))
    _write_text(run_dir / "prompts.jsonl", "".join(json.dumps(p.to_dict()) + "\n" for p in prompts))
    if stage in ("generate", "all"):
        stage_generate(cfg, prompts, run_dir, progress)
    if stage in ("score", "all"):
        stage_score(cfg, prompts, run_dir, progress)
    if stage in ("report", "all"):
        return stage_report(cfg, prompts, run_dir)
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = build_parser().parse_intermixed_args(argv)
    setup_from_args(ns)

    def body() -> int:
        if ns.print_config:
            print(to_yaml(resolve_config(ns.args, ns.task_index, ns.num_tasks)))
            return 0
        run(ns.stage, ns.args, ns.task_index, ns.num_tasks, progress=not (ns.no_progress or ns.quiet))
        return 0

    return run_cli(body, "img-eval", debug=ns.debug)


if __name__ == "__main__":
    sys.exit(main())
