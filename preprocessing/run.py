"""One preprocessing task: plan, skip finished shards, extract and write the rest, maybe finalize.

The plan (``plan.json``) is recomputed by every task and must match what the output directory was
started with; shards are the unit of work and of resumption (see :mod:`preprocessing.stages` for
the extraction pipeline and its crash safety).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from img_lightning.atomic import atomic_write_json
from img_lightning.cache.format import CACHE_DTYPES, GUIDANCE_DTYPES
from img_lightning.cache.lock import ShardLocks
from img_lightning.cache.manifest import Manifest, finalize_manifest, read_shard_index
from img_lightning.cache.writer import shard_is_complete
from img_lightning.config.loading import ConfigError
from img_lightning.config.preprocess import PreprocessConfig, PreprocessRunConfig, guidance_dtype_name
from img_lightning.errors import UserError
from img_lightning.recipe import cache_key_of, recipe_of

from .extract import FeatureExtractor
from .pickapic import ImageFetcher, PairTable, ReaderError, scan_pairs
from .plan import PLAN_NAME, ShardPlan, build_plan, load_plan_document, plan_document, task_from_env
from .stages import (
    REPORTS_DIR,
    Chunk,
    Prefetcher,
    ShardSink,
    ThreadedSink,
    remove_stale_temporaries,
    report_path,
    source,
)

log = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"


class EmptyCacheError(UserError, ValueError):
    """Preprocessing finished without a single usable sample."""


class PlanMismatchError(UserError, ValueError):
    """``data.output`` already holds a cache planned from other input or settings."""


@dataclass
class RunResult:
    task_index: int
    num_tasks: int
    shards_owned: int
    shards_already_done: int
    shards_written: int
    pairs_written: int
    pairs_skipped: int
    seconds: float  # extraction loop only (excludes scanning and model loading)
    manifest: Optional[Manifest] = None
    busy_shards: list[str] = field(default_factory=list)  # held by another process, left to it

    @property
    def pairs_per_s(self) -> float:
        return (self.pairs_written + self.pairs_skipped) / self.seconds if self.seconds > 0 else 0.0


# -- plan bookkeeping ---------------------------------------------------------------------------
def _check_or_write_plan(out: Path, doc: dict) -> None:
    path = out / PLAN_NAME
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        for key in ("cache_key", "fingerprint"):
            if old.get(key) != doc[key]:
                what = "encoder/recipe settings" if key == "cache_key" else "input pairs or shard layout"
                raise PlanMismatchError(
                    f"{out} already holds a cache planned with different {what} ({key} {old.get(key)} != "
                    f"{doc[key]}); use a fresh data.output or restore the original config/input"
                )
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, doc)


def _shard_done(out: Path, name: str, cache_key: str) -> bool:
    path = out / name
    if not shard_is_complete(path):
        return False
    entry, _ = read_shard_index(path)
    if entry.cache_key != cache_key:
        raise PlanMismatchError(f"{path} was written with cache key {entry.cache_key}, this config has {cache_key}; "
                                f"use a fresh data.output")
    return True


def _overlap(run_cfg: PreprocessRunConfig, extractor: FeatureExtractor) -> bool:
    """Overlap the stages with threads only when the encoders run on an accelerator: on a CPU the
    threads compete with the encoders' own compute for the same cores and slow everything down."""
    if run_cfg.overlap == "auto":
        return extractor.mllm.device.type != "cpu" or extractor.ip.device.type != "cpu"
    return run_cfg.overlap == "thread"


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, unit="pair", desc=desc, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5 if tty else 30.0, smoothing=0.05)


def _write_shards(out: Path, shards: list[int], plan: ShardPlan, table: PairTable, extractor: FeatureExtractor,
                  cache_key: str, cache_cfg, run_cfg, progress: bool, desc: str) -> tuple[ShardSink, list[int]]:
    """Extract and write ``shards``; returns the sink (its counters say what was written) and the
    shards left to another process that holds their lock."""
    (out / REPORTS_DIR).mkdir(parents=True, exist_ok=True)
    bar = _progress(sum(len(plan.shard_pairs(k)) for k in shards), progress, desc)

    def on_progress(n: int, s: ShardSink) -> None:
        if n:
            bar.update(n)
        else:
            bar.set_postfix(shards=f"{s.shards_written}/{len(shards)}", skipped=s.skipped)

    dtype = CACHE_DTYPES[cache_cfg.dtype.value]
    guidance_dtype = GUIDANCE_DTYPES[guidance_dtype_name(cache_cfg)]
    locks = ShardLocks(out)
    busy: list[int] = []
    sink = ShardSink(out, plan, cache_key, dtype, on_progress, guidance_dtype=guidance_dtype,
                     outlier_channels=cache_cfg.fp8_outlier_channels, locks=locks)
    overlap = _overlap(run_cfg, extractor)
    threads = int(run_cfg.decode_threads)
    with ThreadPoolExecutor(max_workers=threads) if threads > 1 else contextlib.nullcontext() as pool:
        items: Iterator[Any] = source(shards, plan, table, extractor, ImageFetcher(table, run_cfg.row_group_cache),
                                      pool, locks=locks, busy=busy,
                                      done=lambda k: _shard_done(out, plan.shard_name(k), cache_key))
        prefetcher = Prefetcher(items, run_cfg.prefetch_batches) if overlap else None
        writer = ThreadedSink(sink, run_cfg.prefetch_batches) if overlap else sink
        try:
            for item in prefetcher if prefetcher is not None else items:
                feats = extractor.forward(item.batch) if isinstance(item, Chunk) and item.batch else None
                writer.consume(item, feats)
            if isinstance(writer, ThreadedSink):
                writer.finish()
        except BaseException:
            writer.abort()
            raise
        finally:
            if prefetcher is not None:
                prefetcher.close()
            bar.close()
            locks.release_all()
    return sink, busy


def finalize(out: str | Path) -> Manifest:
    """Assemble ``manifest.json`` and ``summary.json`` once every planned shard exists."""
    out = Path(out)
    doc = load_plan_document(out)
    manifest = finalize_manifest(out, doc["cache_key"], doc["recipe"], expected_shards=doc["shards"])
    reasons: dict[str, int] = {}
    for name in doc["shards"]:
        rep_path = report_path(out, name)
        rep = json.loads(rep_path.read_text(encoding="utf-8")) if rep_path.is_file() else {"skipped": []}
        for s in rep.get("skipped", []):
            reasons[s.get("kind", "bad_image")] = reasons.get(s.get("kind", "bad_image"), 0) + 1
    reader = doc["reader"]
    summary = {
        "rows_read": reader["rows_read"],
        "kept": reader["kept"],
        "ties_dropped": reader["ties_dropped"],
        "duplicates": reader["duplicates"],
        "bad_images": reasons.get("bad_image", 0),
        "bad_prompts": reasons.get("bad_prompt", 0),
        "too_long": reasons.get("too_long", 0),
        "same_images": reasons.get("same_image", 0),
        "nonfinite_features": reasons.get("nonfinite", 0),
        "written": manifest.num_samples,
        "reader": reader,
        "planned_pairs": doc["num_pairs"],
        "shards": len(manifest.shards),
        "bytes": manifest.num_bytes,
        "cache_key": doc["cache_key"],
        "skipped_pairs_listed_in": f"{REPORTS_DIR}/shard-*.json",
    }
    atomic_write_json(out / SUMMARY_NAME, summary)
    if manifest.num_samples == 0:
        raise EmptyCacheError(
            f"{out}: every pair was skipped, the cache holds no samples ({SUMMARY_NAME}: "
            f"{summary['bad_images']} bad images, {summary['same_images']} identical pairs, "
            f"{summary['bad_prompts']} bad prompts, {summary['nonfinite_features']} non-finite features; each "
            f"skipped pair and its reason is in {REPORTS_DIR}/). Check data.input and the encoders."
        )
    return manifest


def validate_config(cfg: PreprocessConfig) -> None:
    """Reject values the schema's types cannot catch, naming the key (before any work starts).
    Choices (backend, kind, dtypes, modes, shuffle, overlap) are Enums: the schema refuses those."""
    from img_lightning.encoders.templates import TEMPLATE_SETS

    if cfg.encoders.mllm.templates not in TEMPLATE_SETS:
        raise ConfigError(f"encoders.mllm.templates={cfg.encoders.mllm.templates!r} is not a built-in question set; "
                          f"use one of {sorted(TEMPLATE_SETS)} or set encoders.mllm.questions to a question file")
    if cfg.cache.fp8_outlier_channels < 0:
        raise ConfigError(f"cache.fp8_outlier_channels={cfg.cache.fp8_outlier_channels} must be >= 0")
    for key, value in (("cache.shard_size", cfg.cache.shard_size), ("encoders.mllm.batch_size",
                       cfg.encoders.mllm.batch_size), ("encoders.ip.batch_size", cfg.encoders.ip.batch_size)):
        if value < 1:
            raise ConfigError(f"{key}={value} must be >= 1")
    if not cfg.data.drop_ties:
        raise ConfigError("data.drop_ties=false is not supported: a tie has no winner to learn from")


def run_preprocess(cfg: PreprocessConfig, task_index: Optional[int] = None, num_tasks: Optional[int] = None,
                   progress: bool = True, extractor: Optional[FeatureExtractor] = None) -> RunResult:
    """Run this task's part of the plan. A single task (``num_tasks == 1``) also finalizes."""
    validate_config(cfg)
    task_index, num_tasks = task_from_env(task_index, num_tasks)
    out = Path(cfg.data.output)
    cache_key, recipe = cache_key_of(cfg), recipe_of(cfg)
    table = scan_pairs(cfg.data.input, split=cfg.data.split, drop_ties=cfg.data.drop_ties,
                       require_different=cfg.data.require_different, limit=cfg.data.limit,
                       drop_empty_captions=cfg.data.drop_empty_captions)
    st = table.stats
    log.info("read %d rows from %d files: kept %d pairs (ties %d, duplicates %d, unlabelled %d, bad labels %d, "
             "missing values %d, empty captions %d, same image %d, empty files %d)", st.rows_read, st.files, st.kept,
             st.ties_dropped, st.duplicates, st.unlabelled, st.bad_labels, st.missing_values, st.empty_captions,
             st.same_image, st.empty_files)
    if len(table) == 0:
        raise ReaderError(f"no usable pairs in data.input={cfg.data.input!r} (see the counts above)")
    plan = build_plan(table, cfg.cache.shard_size, cfg.cache.seed, cfg.cache.shuffle)
    _check_or_write_plan(out, plan_document(plan, table, cache_key, recipe))
    owned = plan.owned(task_index, num_tasks)
    with ShardLocks(out) as locks:
        remove_stale_temporaries(out, locks)
    todo = [k for k in owned if not _shard_done(out, plan.shard_name(k), cache_key)]
    log.info("task %d/%d: %d of %d shards owned, %d already complete, cache key %s", task_index, num_tasks,
             len(owned), plan.num_shards, len(owned) - len(todo), cache_key)
    shards_written = pairs_written = pairs_skipped = 0
    seconds = 0.0
    busy: list[int] = []
    if todo:
        threads = torch.get_num_threads()
        if cfg.run.torch_threads:
            torch.set_num_threads(int(cfg.run.torch_threads))
        try:
            extractor = extractor or FeatureExtractor.from_config(cfg.encoders)
            t0 = time.perf_counter()
            sink, busy = _write_shards(out, todo, plan, table, extractor, cache_key, cfg.cache, cfg.run, progress,
                                       desc=f"task {task_index}/{num_tasks}")
            shards_written, pairs_written, pairs_skipped = sink.shards_written, sink.written, sink.skipped
            seconds = time.perf_counter() - t0
        finally:
            torch.set_num_threads(threads)
    result = RunResult(task_index, num_tasks, len(owned), len(owned) - len(todo), shards_written, pairs_written,
                       pairs_skipped, seconds, busy_shards=[plan.shard_name(k) for k in busy])
    if num_tasks == 1 and not busy:
        result.manifest = finalize(out)
    elif busy:
        log.warning("%d shard(s) were being written by another process (first %s); once it has finished, "
                    "run `img-preprocess manifest %s`", len(busy), plan.shard_name(busy[0]), out)
    return result
