"""The evaluation pipeline behind ``img-eval``: config, checks, then generate, score and report.

:func:`run` is what the CLI calls (and what the demo and tests call):

1. :func:`resolve_config`: schema <- YAML files <- overrides (``scorers.0.path=...`` included), then
   the ``recipe``'s encoders block, so inference features come from the training cache's settings
   (:mod:`img_lightning.config.eval_loading`, shared with ``img-generate``);
2. :func:`~.preflight.preflight`: every key left ``???``, the prompt files, and every model,
   checkpoint and question file the requested stages load, in one error, before anything is
   written to the run directory or any image is generated;
3. the stored images of the prompt set checked against the config
   (:func:`~img_lightning.generation.provenance.check_stored_images`);
4. ``config.yaml`` and ``prompts.jsonl`` into the run directory (a later call with another config
   records its own under ``reruns/NNN/``), then the stages. ``config.yaml`` is complete: the
   recipe's encoders are in it (``recipe_applied`` names the recipe) and the chunk is the whole
   run's, so ``img-eval all RUN/config.yaml`` re-runs the run as it is (finished work is reused).

Every stage is resumable: finished images and scores are skipped while they still match the
config and the scorers (see :mod:`.scoring`). Under a SLURM array each task
takes every N-th prompt (``chunk.index``/``chunk.count``); ``report`` merges all tasks' outputs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from omegaconf import OmegaConf

from ..atomic import atomic_write
from ..config.eval import ChunkConfig, EvalConfig
from ..config.eval_loading import load_eval_config
from ..config.loading import ConfigError, load_config, to_container, to_yaml
from ..eval_run import PromptRecord
from ..generation.provenance import check_stored_images

if TYPE_CHECKING:
    from ..aligner import ImplicitAligner

STAGES = ("generate", "score", "report", "all")


def resolve_config(args: Sequence[str], task_index: Optional[int] = None, num_tasks: Optional[int] = None,
                   allow_missing: bool = False) -> EvalConfig:
    """Schema <- YAML files <- overrides, then the recipe's encoders block
    (:func:`~img_lightning.config.eval_loading.load_eval_config`), then this task's chunk.

    A key left ``???`` (anywhere, lists included) is an error unless ``allow_missing`` (then
    :func:`~.preflight.preflight` reports it together with every other problem).
    """
    cfg = load_eval_config(args, allow_missing=allow_missing)
    if task_index is not None:
        cfg.chunk.index = task_index
    if num_tasks is not None:
        cfg.chunk.count = num_tasks
    if not 0 <= cfg.chunk.index < cfg.chunk.count:
        raise ConfigError(f"chunk.index={cfg.chunk.index} must be in [0, chunk.count={cfg.chunk.count})")
    return cfg


def stage_generate(cfg: EvalConfig, prompts: list[PromptRecord], run_dir: Path, progress: bool,
                   aligner: Optional[ImplicitAligner] = None) -> dict[str, int]:
    from ..eval_run import chunk
    from ..generation.runner import GenerationRun

    mine = chunk(prompts, cfg.chunk.index, cfg.chunk.count)
    run = GenerationRun(cfg, mine, run_dir, progress=progress, aligner=aligner)
    counts = run.run()
    print(f"img-eval generate: {len(mine)} prompts in this task; new images: {counts}")
    for arm, source in run.reused.items():
        print(f"img-eval generate: {arm} = {source}: its settings equal {source}'s (same prompt, seed and sampler, "
              f"negative prompt {cfg.img.negative_prompt!r}, IP scale 0 in every pass), so its {counts[arm]} new "
              f"image(s) are copies of {source}'s, not generated again (metadata: reused_from)")
    return counts


def stage_score(cfg: EvalConfig, prompts: list[PromptRecord], run_dir: Path, progress: bool) -> None:
    from ..eval_run import arm_names, chunk, chunk_tag
    from .scorers import build_scorers
    from .scoring import merge_descriptions, score_run

    if not cfg.scorers:
        print("img-eval score: no scorers configured (scorers: [...]); nothing to do")
        return
    scorers = build_scorers(cfg.scorers)
    merge_descriptions(run_dir, scorers)
    mine = chunk(prompts, cfg.chunk.index, cfg.chunk.count)
    counts = score_run(cfg, mine, run_dir, arm_names(cfg.img.rounds, cfg.img.control), chunk_tag(cfg), scorers,
                       progress)
    print(f"img-eval score: new scores {counts}")


def stage_report(cfg: EvalConfig, prompts: list[PromptRecord], run_dir: Path) -> Path:
    """Report the current prompt set over scores that match the stored scorer descriptions and the
    images now on disk; a metric with scores but no stored description is refused."""
    from ..eval_run import ImageStore, arm_names, chunk_tag, img_arm
    from ..eval_run.store import constant_images
    from ..generation.provenance import aligner_sha256
    from .report import ReportError, ReportInputs, write_report
    from .scorers import scorer_name
    from .scoring import image_hashes, read_scores, scorer_fingerprint

    arms = arm_names(cfg.img.rounds, cfg.img.control)
    metrics_file = run_dir / "scores" / "metrics.json"
    described = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    images, warnings, hashes = {}, [], {}
    for a in arms:
        store = ImageStore(run_dir, a, chunk_tag(cfg), cfg.generation.image_format)
        done = {u: r for u, r in store.done().items() if u in {p.uid for p in prompts}}
        images[a] = {u: str(store.path_for(u)) for u in done}
        hashes[a] = image_hashes(store, list(done))
        constant = constant_images(done)
        if constant:
            warnings.append(f"{a}: {len(constant)} of {len(done)} images have every pixel the same value (e.g. all "
                            f"black; first: {constant[0]}); they are scored like the others - check them before "
                            f"trusting this arm")
    names: list[str] = []
    scores: dict[str, dict[str, dict[str, float]]] = {a: {} for a in arms}
    for c in cfg.scorers:
        m = scorer_name(c)
        if m not in described:
            if any(any((run_dir / "scores" / a).glob(f"{m}.*.jsonl")) for a in arms):
                raise ReportError(f"{metrics_file}: metric '{m}' has scores but no stored description (model, "
                                  f"version, checkpoint sha256, exact/proxy); rerun `img-eval score` with this config "
                                  f"to record it")
            warnings.append(f"metric '{m}' is configured but was never scored in {run_dir}: left out "
                            f"(run img-eval score)")
            continue
        names.append(m)
        fingerprint = scorer_fingerprint(described[m])
        for a in arms:
            scores[a][m] = read_scores(run_dir, a, m, fingerprint, hashes[a])
            stale = {u for u in read_scores(run_dir, a, m) if u in hashes[a]} - set(scores[a][m])
            if stale:
                warnings.append(f"{a}/{m}: {len(stale)} stored score(s) were made by another version of the scorer "
                                f"or on an image since regenerated; they are left out - rerun img-eval score")
    scopes = {scorer_name(c): {p.uid for p in prompts if p.category in set(c.categories)}
              for c in cfg.scorers if c.categories}
    img_settings = {"aligner": str(cfg.img.aligner.checkpoint), "passes": cfg.img.aligner.passes,
                    "ip_scale": cfg.img.ip_scale, "rounds": cfg.img.rounds, "negative_prompt": cfg.img.negative_prompt,
                    "negative_ip_image": getattr(cfg.img.negative_ip_image, "value", cfg.img.negative_ip_image),
                    "negative_ip_scale": cfg.img.negative_ip_scale}
    if cfg.img.rounds:  # what made the stored IMG images (their metadata), else the configured file's
        stores = [ImageStore(run_dir, a, chunk_tag(cfg), cfg.generation.image_format)
                  for a in arms if a.startswith("img_r")]
        made = sorted({str(r.get("aligner_sha256")) for store in stores for r in store.done().values()
                       if r.get("aligner_sha256")})
        img_settings["aligner_sha256"] = ", ".join(made) if made else aligner_sha256(cfg)
    # the control arm with the base images, byte for byte, for every prompt (its settings equal base's)
    control_is_base = "control" in arms and hashes["control"] and hashes["control"] == hashes["base"]
    same_images = {"control": "base"} if control_is_base else {}
    inputs = ReportInputs(
        prompts=prompts, scores=scores, images=images, same_images=same_images,
        metrics={m: described[m] for m in names},
        img_arms=[img_arm(r) for r in range(1, cfg.img.rounds + 1)],
        title=f"IMG evaluation: {cfg.prompts.name} ({cfg.generation.pipeline.kind})",
        config=to_container(cfg),
        run_dir=run_dir,
        warnings=warnings,
        scopes=scopes,
        img_settings=img_settings,
    )
    r = cfg.report
    paths = write_report(inputs, run_dir / "report", r.bootstrap, r.seed, r.tie_tolerance, r.gallery_limit,
                         r.thumb_size)
    print(f"img-eval report: {paths['html']}")
    return paths["html"]


def _config_tree(cfg: EvalConfig) -> dict:
    """The config as compared between calls: without ``chunk`` (each array task has its own)."""
    tree = to_container(cfg)
    tree.pop("chunk", None)
    return tree


def run_record(cfg: EvalConfig) -> str:
    """The config as the run's ``config.yaml``: complete and re-runnable as it is, for the whole run
    (an array task's ``chunk`` is its own, not the run's)."""
    whole = OmegaConf.merge(cfg, {"chunk": OmegaConf.structured(ChunkConfig)})
    return to_yaml(whole)


def record_config(run_dir: Path, cfg: EvalConfig, prompts: list[PromptRecord], stage: str) -> Path:
    """The first call's ``config.yaml`` and ``prompts.jsonl`` stay the run's record; a later call
    with another config (or prompt set) writes its own pair under ``reruns/NNN/`` with the changed
    keys, never overwriting the first. Returns the folder written to (or the run dir if unchanged)."""
    from ..config.changes import config_changes

    text = "".join(json.dumps(p.to_dict()) + "\n" for p in prompts)
    first = run_dir / "config.yaml"
    if not first.is_file():
        atomic_write(first, run_record(cfg))
        atomic_write(run_dir / "prompts.jsonl", text)
        return run_dir
    saved = load_config(EvalConfig, [first], require_complete=False)
    changes = config_changes(_config_tree(saved), _config_tree(cfg))
    old_prompts = run_dir / "prompts.jsonl"
    same_prompts = old_prompts.is_file() and old_prompts.read_text(encoding="utf-8") == text
    if not changes and same_prompts:
        return run_dir
    done = sorted(p for p in (run_dir / "reruns").glob("[0-9][0-9][0-9]") if p.is_dir())
    target = run_dir / "reruns" / f"{len(done) + 1:03d}"
    target.mkdir(parents=True, exist_ok=True)
    atomic_write(target / "config.yaml", run_record(cfg))
    atomic_write(target / "prompts.jsonl", text)
    atomic_write(target / "changes.json", json.dumps(
        {"stage": stage, "prompts_changed": not same_prompts,
         "config_changes": {k: [a, b] for k, (a, b) in changes.items()}}, indent=2, default=str))
    print(f"img-eval: the config differs from {first} (kept as the run's first record); this call's config "
          f"is recorded in {target}")
    return target


def run(stage: str, args: Sequence[str], task_index: Optional[int] = None, num_tasks: Optional[int] = None,
        progress: bool = True) -> Optional[Path]:
    """Resolve, check, then run ``stage`` (``generate``/``score``/``report``/``all``); returns the
    report's HTML path for report/all. Nothing is written before the checks pass."""
    from .preflight import preflight

    if stage not in STAGES:
        raise ConfigError(f"unknown img-eval stage {stage!r}; use one of {list(STAGES)}")
    cfg = resolve_config(args, task_index, num_tasks, allow_missing=True)
    ready = preflight(cfg, stage)
    run_dir = Path(cfg.run_dir)
    check_stored_images(cfg, ready.prompts, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record_config(run_dir, cfg, ready.prompts, stage)
    if stage in ("generate", "all"):
        stage_generate(cfg, ready.prompts, run_dir, progress, ready.aligner)
    if stage in ("score", "all"):
        stage_score(cfg, ready.prompts, run_dir, progress)
    if stage in ("report", "all"):
        return stage_report(cfg, ready.prompts, run_dir)
    return None
