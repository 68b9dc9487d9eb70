"""``img-demo --real-width``: every stage of the pipeline on the real-width world, at minimal size.

The tiny demo proves the pipeline on models 32-64 channels wide. This one runs the same stages on
models with the released models' widths and very few layers (:mod:`img_lightning.tiny.real_width`:
LLaVA-1.5-13B's 5120-wide decoder and 32064-token vocabulary with 576 image tokens, IP-Adapter-Plus
SDXL at real size, SDXL's UNet channel and cross-attention widths, the paper-size aligner), so the
shapes, dtypes and memory of the real run are exercised end to end on a CPU:

1. models (built once under ``OUT/models``, ~4.6 GB, reused) and the demo's procedurally drawn data;
2. ``img-finetune-mllm``: LoRA on the real-width LLaVA for two steps, then its export;
3. ``img-preprocess``: guidance [~630, 5120] + IP tokens [16, 2048] of a few pairs, with the export;
4. ``img-train``: the paper-size aligner for a few steps;
5. ``img-eval all``: base vs control vs IMG for one held-out caption with the real-width SDXL.

Nothing here is about quality (a few steps of random models); ``benchmarks/real_width.py`` times
each stage (one process per stage, for its peak memory) from the same functions.
"""

from __future__ import annotations

import gc
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from img_lightning.config.loading import load_config, resolve_config_path

PREPROCESS_CONFIG = resolve_config_path("configs/preprocess/real_width.yaml")
TRAIN_CONFIG = resolve_config_path("configs/train/real_width.yaml")
FINETUNE_CONFIG = resolve_config_path("configs/finetune_mllm/real_width.yaml")
EVAL_CONFIG = resolve_config_path("configs/eval/real_width.yaml")


@dataclass(frozen=True)
class RealWidthRun:
    """Where the real-width demo writes and how much it runs (minimal by default)."""

    out: Path
    pairs: int = 4  # training pairs (+1 tie and +1 corrupt image, both dropped by preprocessing)
    val_pairs: int = 2
    triplets: int = 6
    mllm_steps: int = 2
    steps: int = 3
    eval_prompts: int = 1
    seed: int = 0
    progress: bool = False

    @property
    def models(self) -> Path:
        return self.out / "models"

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    def cache(self, split: str) -> Path:
        return self.out / "cache" / split

    @property
    def mllm_export(self) -> Path:
        return self.runs / "real-width-mllm" / "export"

    @property
    def aligner(self) -> Path:
        return self.runs / "real-width" / "export" / "aligner.pth"


def world(run: RealWidthRun, log: Callable[[str], None] = print) -> dict[str, Path]:
    from img_lightning.tiny.real_width import build_real_width_world

    return build_real_width_world(run.models, only=("llava", "sdxl", "ip_adapter"), seed=run.seed, log=log)


def stage_data(run: RealWidthRun) -> dict[str, Any]:
    """The demo's Pick-a-Pic-schema pairs (train, held-out) and edit triplets."""
    from preprocessing.demo_data import write_demo_parquet, write_edit_triplets_parquet

    write_demo_parquet(run.data / "train.parquet", run.pairs, seed=run.seed)
    write_demo_parquet(run.data / "val.parquet", run.val_pairs, seed=run.seed + 1)
    write_edit_triplets_parquet(run.data / "edit_triplets.parquet", run.triplets, seed=run.seed + 2)
    return {"items": run.pairs + run.val_pairs, "unit": "pair", "outputs": [run.data]}


def stage_finetune(run: RealWidthRun) -> dict[str, Any]:
    """LoRA-finetune the real-width LLaVA on the triplets and export it (llava-hf folder + manifest)."""
    from img_lightning.config.finetune_mllm import FinetuneMLLMConfig
    from img_lightning.finetune.training import run_finetune

    overrides = [f"data.input={run.data / 'edit_triplets.parquet'}", f"mllm.path={world(run)['llava']}",
                 f"run.root={run.runs}", f"trainer.max_steps={run.mllm_steps}",
                 f"trainer.enable_progress_bar={run.progress}"]
    result = run_finetune(load_config(FinetuneMLLMConfig, [FINETUNE_CONFIG], overrides))
    assert result.export_dir is not None and Path(result.export_dir) == run.mllm_export
    return {"items": run.mllm_steps, "unit": "step (1 triplet)", "outputs": [run.runs / "real-width-mllm"],
            "loss": result.metrics.get("val/loss")}


def stage_preprocess(run: RealWidthRun) -> dict[str, Any]:
    """Guidance of the finetuned export + IP tokens of every pair -> two feature caches."""
    from img_lightning.cache import Manifest
    from img_lightning.config.preprocess import PreprocessConfig
    from img_lightning.tiny.world import preprocess_overrides

    from .run import run_preprocess

    models = {**world(run), "llava": run.mllm_export}
    written = tokens = nbytes = 0
    loop_seconds = 0.0
    for split in ("train", "val"):
        overrides = [f"data.input={run.data / f'{split}.parquet'}", f"data.output={run.cache(split)}",
                     *preprocess_overrides(models)]
        result = run_preprocess(load_config(PreprocessConfig, [PREPROCESS_CONFIG], overrides), progress=run.progress)
        loop_seconds += result.seconds  # the extraction loop (models loaded before it)
        manifest = Manifest.load(run.cache(split))
        written += manifest.num_samples
        nbytes += manifest.num_bytes
        tokens += sum(_num_tokens(run.cache(split)))
    return {"items": written, "unit": "pair", "outputs": [run.out / "cache"], "tokens_per_pair": tokens / written,
            "cache_bytes_per_pair": nbytes / written, "loop_seconds": loop_seconds}


def _num_tokens(cache: Path) -> list[int]:
    from img_lightning.cache import CacheView

    return [int(t) for t in CacheView.open(cache).num_tokens.tolist()]


def stage_train(run: RealWidthRun) -> dict[str, Any]:
    """The paper-size aligner on the real-width cache (reads the finetuned export's identity)."""
    from img_lightning.config.train import TrainConfig
    from img_lightning.training import run_training

    overrides = [f"data.cache={run.cache('train')}", f"data.val_cache={run.cache('val')}", f"run.root={run.runs}",
                 f"data.recipe_overrides=[encoders.mllm.path={run.mllm_export}]", f"trainer.max_steps={run.steps}",
                 f"trainer.val_check_interval={run.steps}", f"trainer.checkpoint_every_n_steps={run.steps}",
                 f"trainer.enable_progress_bar={run.progress}"]
    cfg = load_config(TrainConfig, [TRAIN_CONFIG], overrides)
    result = run_training(cfg)
    assert Path(result.exports["aligner.pth"]) == run.aligner
    return {"items": run.steps * cfg.data.batch_size, "unit": "pair (trained)", "outputs": [run.runs / "real-width"],
            "steps": run.steps, "metrics": result.metrics}


def stage_eval(run: RealWidthRun) -> dict[str, Any]:
    """``img-eval all`` (generate base / control / IMG, score, report) on held-out captions."""
    import pyarrow.parquet as pq

    from img_lightning.evaluation.pipeline import run as eval_run
    from img_lightning.tiny.scorers import build_tiny_scorers

    models = world(run)
    captions = sorted({c for c in pq.read_table(run.data / "val.parquet", columns=["caption"]).column("caption")
                       .to_pylist() if c})
    random.Random(run.seed).shuffle(captions)
    prompts = run.data / "eval_prompts.txt"
    prompts.write_text("\n".join(captions[: run.eval_prompts]) + "\n", encoding="utf-8")
    scorers = build_tiny_scorers(run.out / "tiny_scorers")
    args = [str(EVAL_CONFIG), f"run_dir={run.out / 'eval'}", f"prompts.path={prompts}",
            f"prompts.limit={run.eval_prompts}", f"recipe={PREPROCESS_CONFIG}",
            f"generation.pipeline.path={models['sdxl']}", f"img.ip_adapter.path={models['ip_adapter']}",
            f"encoders.ip.image_encoder_path={models['ip_adapter']}",
            f"encoders.ip.adapter_path={models['ip_adapter']}",
            f"encoders.mllm.path={run.mllm_export}", f"img.aligner.checkpoint={run.aligner}",
            f"scorers.0.path={scorers['clip']}", f"scorers.0.processor_path={scorers['clip']}"]
    html = eval_run("all", args, progress=run.progress)
    images = sum(1 for _ in (run.out / "eval").rglob("*.png"))
    return {"items": run.eval_prompts, "unit": "prompt (base + control + IMG)", "outputs": [run.out / "eval"],
            "images": images, "report": html}


STAGES: dict[str, Callable[[RealWidthRun], dict[str, Any]]] = {
    "data": stage_data,
    "finetune": stage_finetune,
    "preprocess": stage_preprocess,
    "train": stage_train,
    "eval": stage_eval,
}


def run_all(run: RealWidthRun) -> dict[str, dict[str, Any]]:
    """Every stage in order, in this process (``img-demo --real-width``); prints a line per stage."""
    import shutil

    for sub in ("data", "cache", "runs", "eval"):
        shutil.rmtree(run.out / sub, ignore_errors=True)
    start = time.perf_counter()
    print("\n== real-width models (the released widths, 1-2 layers; built once)", flush=True)
    for name, path in world(run, log=lambda m: print(m, flush=True)).items():
        print(f"   {name}: {path}")
    results = {}
    for name, fn in STAGES.items():
        print(f"\n== {name}", flush=True)
        t = time.perf_counter()
        results[name] = fn(run)
        gc.collect()  # the stage's models, before the next stage loads its own
        print(f"   ({time.perf_counter() - t:.0f} s)", flush=True)
    print(f"\n== real-width run: every stage done in {time.perf_counter() - start:.0f} s; aligner {run.aligner}; "
          f"report {results['eval']['report']}")
    return results
