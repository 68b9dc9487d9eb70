"""``img-demo``: the whole IMG pipeline end to end on tiny models and synthetic data, on a laptop CPU.

1. build tiny, randomly initialised models in their real on-disk formats (LLaVA-style MLLM,
   CLIP vision tower + IP-Adapter-Plus checkpoint, SDXL pipeline, evaluation scorers);
2. draw a small Pick-a-Pic-schema parquet (winner matches the caption, loser gets one attribute
   wrong; plus a tie and a corrupt image), a held-out one, and InstructPix2Pix-layout edit triplets
   (the image shows one attribute wrong, the prompt the right scene, the instruction the change:
   "make the square red"; plus a corrupt image and an empty instruction);
3. ``img-finetune-mllm`` the tiny LLaVA on the triplets into a misalignment detector (the paper's
   MLLM stage), and compare its held-out answers with the base model's (ROUGE-L, before/after);
4. ``img-preprocess`` both Pick-a-Pic parquets into feature caches, with the finetuned export as the MLLM;
5. ``img-train`` the Implicit Aligner (1-2 minutes on 2 cores) and compare it with the identity
   baseline on the held-out pairs;
6. ``img-eval all`` on a few held-out captions: base vs control vs IMG, scored and reported;
   then ``img-generate`` on one caption with the evaluation's own ``config.yaml``: the command the
   summary shows for your own prompts.

The demo's own check is a tolerance, not a figure: the trained aligner must end at least
``MIN_IMPROVEMENT`` below the identity baseline on the held-out pairs (the figure itself depends on
the CPU and the library versions: docs/demo.md).

``img-demo --slurm`` runs the same stages as SLURM jobs instead: it builds the models and the data,
writes ``configs/pipeline/demo.yaml`` with their paths filled in to ``OUT/pipeline.yaml`` and
submits it with ``img-submit`` (run it from the repository root, on a cluster or on
``slurm/local_cluster.sh``).

It lives in ``preprocessing/`` because it drives every stage; the library never imports it.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from img_lightning.cli.common import add_common_arguments, parse_command, run_cli, setup_from_args, show_progress
from img_lightning.config.loading import load_config, resolve_config_path
from img_lightning.config.train import TrainConfig

PREPROCESS_CONFIG = resolve_config_path("configs/preprocess/demo.yaml")
TRAIN_CONFIG = resolve_config_path("configs/train/demo.yaml")
FINETUNE_CONFIG = resolve_config_path("configs/finetune_mllm/demo.yaml")
# The trained aligner's held-out ||c_w - f(c)||^2 must be this much below the identity baseline's.
MIN_IMPROVEMENT = 0.20
PIPELINE_CONFIG = resolve_config_path("configs/pipeline/demo.yaml")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="img-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo_output"), help="working directory (default: ./demo_output)")
    p.add_argument("--pairs", type=int, default=640, help="training pairs to draw")
    p.add_argument("--val-pairs", type=int, default=128, help="held-out pairs to draw")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: configs/train/demo.yaml)")
    p.add_argument("--triplets", type=int, default=320, help="edit triplets for the MLLM finetuning stage")
    p.add_argument("--mllm-steps", type=int, default=None,
                   help="MLLM finetuning steps (default: configs/finetune_mllm/demo.yaml)")
    p.add_argument("--eval-prompts", type=int, default=4, help="held-out captions to evaluate (0: skip evaluation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real-width", action="store_true",
                   help="run every stage on models at the released models' widths with 1-2 layers (LLaVA-13B, "
                        "SDXL, IP-Adapter-Plus, the paper-size aligner) at minimal size, under OUT/real_width "
                        "(~5 GB of models built once; see preprocessing/demo_real_width.py)")
    p.add_argument("--slurm", action="store_true",
                   help="submit the stages as SLURM jobs (img-submit OUT/pipeline.yaml) instead of running them here")
    p.add_argument("--dry-run", action="store_true", help="with --slurm: write OUT/pipeline.yaml, submit nothing")
    add_common_arguments(p)
    return p


def _stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _done(start: float) -> None:
    print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_command(_parser(), argv)
    setup_from_args(args)
    if args.slurm:
        return run_cli(lambda: _slurm(args), "img-demo", debug=args.debug)
    return run_cli(lambda: _demo(args), "img-demo", debug=args.debug)


def _real_width(args: argparse.Namespace) -> int:
    from preprocessing.demo_real_width import RealWidthRun, run_all

    sizes = {k: v for k, v in (("steps", args.steps), ("mllm_steps", args.mllm_steps)) if v is not None}
    run_all(RealWidthRun(args.out.resolve() / "real_width", seed=args.seed, progress=not args.quiet, **sizes))
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.real_width:
        return _real_width(args)
    from img_lightning.tiny.world import build_tiny_world, preprocess_overrides
    from preprocessing.cli import main as preprocess_main
    from preprocessing.demo_data import write_demo_parquet, write_edit_triplets_parquet

    out = args.out.resolve()
    # Models are reused between runs; data, caches and runs are made afresh.
    for sub in ("data", "cache", "runs", "eval", "generate"):
        shutil.rmtree(out / sub, ignore_errors=True)
    total = time.perf_counter()

    t = _stage("1/6 tiny models (real formats, random weights)")
    models = build_tiny_world(out / "models", seed=args.seed)
    for name, path in models.items():
        print(f"   {name}: {path}")
    _done(t)

    t = _stage("2/6 demo data (Pick-a-Pic schema and edit triplets, procedurally drawn)")
    train_pq, val_pq = out / "data" / "train.parquet", out / "data" / "val.parquet"
    summary = write_demo_parquet(train_pq, args.pairs, seed=args.seed)
    write_demo_parquet(val_pq, args.val_pairs, seed=args.seed + 1)
    print(f"   {train_pq}: {summary}")
    triplets_pq = out / "data" / "edit_triplets.parquet"
    triplets = write_edit_triplets_parquet(triplets_pq, args.triplets, seed=args.seed + 2)
    print(f"   {triplets_pq}: {triplets['triplets']} triplets + 1 corrupt image + 1 empty instruction")
    _done(t)

    t = _stage("3/6 img-finetune-mllm: the tiny LLaVA learns to say what to change")
    mllm = _finetune_mllm(args, out, models["llava"], triplets_pq)
    _done(t)
    # Preprocessing and the IMG step read the finetuned MLLM; the MLLM grader stays the base model.
    models = {**models, "llava": mllm["export"], "llava_base": models["llava"]}

    t = _stage("4/6 img-preprocess: MLLM guidance + IP features -> feature caches")
    caches = {"train": out / "cache" / "train", "val": out / "cache" / "val"}
    for split, parquet in (("train", train_pq), ("val", val_pq)):
        argv_pre = ["run", str(PREPROCESS_CONFIG), f"data.input={parquet}", f"data.output={caches[split]}",
                    *preprocess_overrides(models)]
        if not show_progress(args):
            argv_pre.append("--no-progress")
        code = preprocess_main(argv_pre)
        if code != 0:
            print(f"img-preprocess failed on {parquet} (exit {code})", file=sys.stderr)
            return code
    _done(t)

    t = _stage("5/6 img-train: Implicit Aligner with the preference objective")
    from img_lightning.cli.train import report
    from img_lightning.training import run_training

    # The finetuned export is part of the cache key (its manifest's sha256): the recipe names it.
    overrides = [f"data.cache={caches['train']}", f"data.val_cache={caches['val']}", f"run.root={out / 'runs'}",
                 f"data.recipe_overrides=[encoders.mllm.path={models['llava']}]",
                 f"trainer.enable_progress_bar={show_progress(args)}"]
    if args.steps is not None:
        overrides.append(f"trainer.max_steps={args.steps}")
    result = run_training(load_config(TrainConfig, [TRAIN_CONFIG], overrides))
    report(result)
    _done(t)
    m = result.metrics

    html = generated = None
    if args.eval_prompts > 0:
        t = _stage("6/6 img-eval: base vs control vs IMG on held-out captions")
        import pyarrow.parquet as pq

        from img_lightning.tiny.demo_eval import run_demo_eval

        captions = sorted({c for c in pq.read_table(val_pq, columns=["caption"]).column("caption").to_pylist() if c})
        random.Random(args.seed).shuffle(captions)
        prompts = out / "data" / "eval_prompts.txt"
        prompts.write_text("\n".join(captions[: args.eval_prompts]) + "\n", encoding="utf-8")
        html = run_demo_eval(
            out, models["sdxl"], models["ip_adapter"], models["llava"], result.run_dir / "export" / "aligner.pth",
            prompts, limit=args.eval_prompts, extra=["prompts.format=text", "prompts.name=demo-heldout"],
            progress=show_progress(args), grader_dir=models["llava_base"],
        )
        generated = _try_generate(out, captions[0], quiet=args.quiet)
        _done(t)

    print("\n== summary")
    print(f"   MLLM held-out ROUGE-L (vs the reference instruction): base {mllm['before']:.4f}, "
          f"finetuned {mllm['after']:.4f}; export {mllm['export']}")
    if "val/identity" in m:
        print(f"   held-out ||c_w - f(c)||^2: identity {m['val/identity']:.5f}, trained {m['val/base']:.5f} "
              f"({100 * m['val/rel_improvement']:.1f}% lower)")
    print(f"   TensorBoard: tensorboard --logdir {result.run_dir / 'tensorboard'}")
    print(f"   aligner: {result.run_dir / 'export' / 'aligner.pth'} (official layout)")
    if html is not None:
        print(f"   evaluation report: {html}")
    if generated is not None:
        command, strip = generated
        print(f"   your own prompt (base image + IMG refinement, side by side): {command}\n"
              f"     e.g. {strip}; in Python: from img_lightning import IMGRefiner; "
              f"IMGRefiner.from_config({str(out / 'eval' / 'config.yaml')!r})(\"your prompt\", seed=0)")
    print(f"   total {time.perf_counter() - total:.0f} s")
    gain = m.get("val/rel_improvement")
    if gain is None or gain < MIN_IMPROVEMENT:
        got = "no held-out figure" if gain is None else f"{100 * gain:.1f}% below the identity baseline"
        print(f"the trained aligner ended {got}; the demo expects at least {100 * MIN_IMPROVEMENT:.0f}% "
              f"(more --steps or --pairs)", file=sys.stderr)
        return 1
    if not mllm["after"] > mllm["before"]:
        print("the finetuned MLLM did not beat the base model's held-out ROUGE-L", file=sys.stderr)
        return 1
    return 0


def _try_generate(out: Path, caption: str, quiet: bool) -> Optional[tuple[str, Path]]:
    """``img-generate`` on one held-out caption with the evaluation's saved config (complete: every
    tiny model's path, the aligner); returns the command (to copy) and the strip it wrote."""
    import shlex

    from img_lightning.cli.generate import main as generate_main

    argv = [str(out / "eval" / "config.yaml"), "--prompt", caption, "--out", str(out / "generate")]
    if generate_main([*argv, *(["-q"] if quiet else [])]) != 0:
        return None
    strips = sorted((out / "generate").glob("*_strip.png"))
    return "img-generate " + " ".join(shlex.quote(a) for a in argv), strips[-1]


def deliberate_bad_share(triplets: int) -> float:
    """Twice the share of an epoch that the demo data's one corrupt image can be: the held-out
    split and the batch remainder leave fewer than ``triplets`` samples in an epoch."""
    return round(2.0 / max(1, triplets), 4)


def _slurm(args: argparse.Namespace) -> int:
    """Models and data (kept when already there, so a resubmission resumes), the demo recipe with
    their paths, submitted by img-submit."""
    import json

    import pyarrow.parquet as pq

    from img_lightning.cli.submit import main as submit_main
    from img_lightning.config.loading import to_yaml
    from img_lightning.config.pipeline import PipelineConfig
    from img_lightning.tiny.demo_eval import tiny_eval_overrides
    from img_lightning.tiny.scorers import build_tiny_scorers
    from img_lightning.tiny.world import build_tiny_world, preprocess_overrides
    from preprocessing.demo_data import write_demo_parquet, write_edit_triplets_parquet

    out = args.out.resolve()
    models = build_tiny_world(out / "models", seed=args.seed)
    listing = out / "tiny_scorers" / "paths.json"
    if not listing.is_file():
        scorers = build_tiny_scorers(out / "tiny_scorers")
        listing.write_text(json.dumps({k: str(v) for k, v in scorers.items()}))
    scorers = {k: Path(v) for k, v in json.loads(listing.read_text()).items()}
    data = out / "data"
    train_pq, val_pq, triplets_pq = data / "train.parquet", data / "val.parquet", data / "edit_triplets.parquet"
    if not train_pq.is_file():
        write_demo_parquet(train_pq, args.pairs, seed=args.seed)
    if not val_pq.is_file():
        write_demo_parquet(val_pq, args.val_pairs, seed=args.seed + 1)
    if not triplets_pq.is_file():
        write_edit_triplets_parquet(triplets_pq, args.triplets, seed=args.seed + 2)
    prompts = data / "eval_prompts.txt"
    if not prompts.is_file():
        captions = sorted({c for c in pq.read_table(val_pq, columns=["caption"]).column("caption").to_pylist() if c})
        random.Random(args.seed).shuffle(captions)
        prompts.write_text("\n".join(captions[: max(1, args.eval_prompts)]) + "\n", encoding="utf-8")

    cfg = load_config(PipelineConfig, [PIPELINE_CONFIG], [f"root={out / 'pipeline'}"], require_complete=False)
    cfg.mllm.data = str(triplets_pq)
    cfg.mllm.overrides += [f"mllm.path={models['llava']}", "trainer.enable_progress_bar=false"]
    if args.mllm_steps is not None:
        cfg.mllm.overrides.append(f"trainer.max_steps={args.mllm_steps}")
    cfg.preprocess.input = str(train_pq)
    cfg.preprocess.overrides += [o for o in preprocess_overrides(models) if not o.startswith("encoders.mllm.")]
    cfg.train.overrides.append("trainer.enable_progress_bar=false")
    if args.steps is not None:
        cfg.train.overrides.append(f"trainer.max_steps={args.steps}")
    # run_dir, the MLLM and the aligner are the pipeline's (img-submit puts its own values last)
    cfg.eval.enabled = args.eval_prompts > 0
    cfg.eval.overrides += tiny_eval_overrides(out / "pipeline" / "eval", models["sdxl"], models["ip_adapter"],
                                              models["llava"], "-", scorers, prompts, limit=args.eval_prompts,
                                              grader_dir=models["llava"])
    recipe = out / "pipeline.yaml"
    recipe.write_text(to_yaml(cfg), encoding="utf-8")
    print(f"demo recipe: {recipe} (submit it again with: img-submit {recipe})")
    return submit_main([str(recipe), *(["--dry-run"] if args.dry_run else [])])


def _finetune_mllm(args: argparse.Namespace, out: Path, llava: Path, triplets: Path) -> dict:
    """Finetune the tiny LLaVA on the edit triplets, evaluate base vs finetuned on the held-out
    ones; returns the export folder and the two held-out ROUGE-L values."""
    from img_lightning.cli.finetune_mllm import report_eval, report_training
    from img_lightning.config.finetune_mllm import FinetuneMLLMConfig
    from img_lightning.finetune.evaluate import run_eval
    from img_lightning.finetune.training import run_finetune

    overrides = [f"data.input={triplets}", f"mllm.path={llava}", f"run.root={out / 'runs'}",
                 f"trainer.enable_progress_bar={show_progress(args)}"]
    if args.mllm_steps is not None:
        overrides.append(f"trainer.max_steps={args.mllm_steps}")
    cfg = load_config(FinetuneMLLMConfig, [FINETUNE_CONFIG], overrides)
    # The demo data holds one corrupt image on purpose; with few triplets that one image is more than
    # the config's share of an epoch, so allow it (and nothing more) explicitly.
    cfg.data.max_bad_fraction = max(float(cfg.data.max_bad_fraction), deliberate_bad_share(args.triplets))
    result = run_finetune(cfg)
    report_training(result)
    evaluated = run_eval(cfg, progress=show_progress(args))
    report_eval(evaluated)
    return {"export": result.export_dir, "before": evaluated.metrics["base"]["rouge_l"],
            "after": evaluated.metrics["finetuned"]["rouge_l"], "eval": evaluated.out_dir}


if __name__ == "__main__":
    raise SystemExit(main())
