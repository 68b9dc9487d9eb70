"""The three stages of a preprocessing task and the threads that overlap them.

    source (fetch JPEG bytes, decode, processors) -> encoders (main thread) -> sink (cast, shards)

With the encoders on an accelerator the source runs in a background thread
(:class:`Prefetcher`, ``run.prefetch_batches`` ahead) and the sink in another
(:class:`ThreadedSink`), so the accelerator never waits for decoding or writing. On a CPU both run
inline: extra threads would only fight the encoders for the same cores (``run.overlap``).

Crash safety comes from :class:`img_lightning.cache.ShardWriter` (temporary name, renamed when
complete, index written last): a killed task leaves at most a hidden ``.shard-*.tmp`` file, which
the next run of the same shard deletes before rewriting it. One writer per shard: the source takes
the shard's lock (:mod:`img_lightning.cache.lock`) before starting it and the sink releases it once
the shard is written, so concurrent or overlapping tasks never touch each other's files. Each
shard's report (which pairs were skipped and why) is written BEFORE the shard is renamed, so a
finished shard always has one.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from img_lightning.atomic import atomic_write_json
from img_lightning.cache.lock import ShardLocks
from img_lightning.cache.quant import DEFAULT_OUTLIER_CHANNELS, NonFiniteFeatures, to_storage
from img_lightning.cache.writer import ShardWriter
from img_lightning.encoders.conversation import PromptTextError, PromptTooLong

from .extract import FeatureExtractor, PairItem, PreparedBatch
from .pickapic import ImageFetcher, PairTable, decode_image
from .plan import ShardPlan

log = logging.getLogger(__name__)

REPORTS_DIR = "reports"


@dataclass
class Chunk:
    """One prepared batch of a shard (``batch`` None if every pair of it was undecodable)."""

    shard: int
    batch: Optional[PreparedBatch]
    skipped: list[dict]


@dataclass
class ShardEnd:
    shard: int
    planned: int


def report_path(out: Path, shard_name: str) -> Path:
    return out / REPORTS_DIR / (shard_name[: -len(".tar")] + ".json")


# -- temporaries ----------------------------------------------------------------------------------
_SHARD_TEMP = re.compile(r"^\.(shard-\d+)\..*\.tmp$")


def remove_shard_temporaries(out: Path, name: str) -> None:
    """Delete the temporary files of shard ``name`` (call only while holding its lock)."""
    stem = name[: -len(".tar")] if name.endswith(".tar") else name
    for folder in (out, out / REPORTS_DIR):
        for tmp in folder.glob(f".{stem}.*.tmp"):
            log.info("removing %s, left by an interrupted run", tmp)
            tmp.unlink(missing_ok=True)


def remove_stale_temporaries(out: Path, locks: ShardLocks) -> None:
    """Remove temporary files of every shard no live process is writing (its lock is free)."""
    stems = {m.group(1) for folder in (out, out / REPORTS_DIR) if folder.is_dir()
             for p in folder.iterdir() if (m := _SHARD_TEMP.match(p.name))}
    for stem in sorted(stems):
        name = f"{stem}.tar"
        if locks.acquire(name):
            try:
                remove_shard_temporaries(out, name)
            finally:
                locks.release(name)
        else:
            log.info("temporary files of %s belong to a live writer (it holds the shard's lock): left alone", name)


# -- source -------------------------------------------------------------------------------------
def _decode_pair(data: tuple[Optional[bytes], Optional[bytes]]):
    winner, why_w = decode_image(data[0])
    loser, why_l = decode_image(data[1])
    if winner is not None and loser is not None:
        return winner, loser, None
    return winner, loser, f"winner: {why_w}" if why_w else f"loser: {why_l}"


def pair_meta(table: PairTable, i: int, template_id: int, template_set: str, mllm_prompt: Optional[str] = None,
              questions_sha256: Optional[str] = None) -> dict:
    meta = {
        "pair_id": table.pair_id[i],
        "caption": table.caption[i],
        "winner_uid": table.winner_uid[i],
        "loser_uid": table.loser_uid[i],
        "winner_index": int(table.winner_index[i]),
        "template_id": template_id,  # the question's index in the question set
        "template_set": template_set,
        "source": table.source(i),
    }
    if questions_sha256 is not None:
        meta["questions_sha256"] = questions_sha256
    if mllm_prompt is not None:
        meta["mllm_prompt"] = mllm_prompt
    ranking_id = table.ranking_id[i]
    if ranking_id is not None:
        meta["ranking_id"] = int(ranking_id)
    return meta


def source(shards: list[int], plan: ShardPlan, table: PairTable, extractor: FeatureExtractor,
           fetcher: ImageFetcher, pool: Optional[ThreadPoolExecutor], locks: Optional[ShardLocks] = None,
           busy: Optional[list[int]] = None, done: Callable[[int], bool] = lambda k: False) -> Iterator[Any]:
    """Everything before the encoders, shard by shard: fetch bytes, decode, prepare batches.

    With ``locks``, a shard is started only once its lock is taken (released by the sink when the
    shard is written); a shard another process holds is skipped, logged and listed in ``busy``,
    and one that became complete meanwhile (``done``) is skipped too.
    """
    step = extractor.batch_size
    for k in shards:
        name = plan.shard_name(k)
        if locks is not None:
            if not locks.acquire(name):
                log.warning("%s is being written by another process (it holds the shard's lock in %s): leaving "
                            "it to that process", name, locks.dir)
                if busy is not None:
                    busy.append(k)
                continue
            if done(k):
                locks.release(name)
                continue
        indices = [int(i) for i in plan.shard_pairs(k)]
        raw = fetcher.fetch(indices)
        for start in range(0, len(indices), step):
            part, chunk = indices[start : start + step], raw[start : start + step]
            decoded = list(pool.map(_decode_pair, chunk)) if pool is not None else [_decode_pair(c) for c in chunk]
            items, skipped = [], []
            for i, (winner, loser, reason), (w_bytes, l_bytes) in zip(part, decoded, chunk, strict=True):
                if reason is None and w_bytes == l_bytes:  # nothing to prefer: it would train ip_win == ip_lose
                    skipped.append({"pair_id": table.pair_id[i], "source": table.source(i), "kind": "same_image",
                                    "reason": "the two images have identical bytes"})
                    continue
                if reason is not None:
                    skipped.append({"pair_id": table.pair_id[i], "source": table.source(i), "kind": "bad_image",
                                    "reason": reason})
                    continue
                tid = extractor.template_id(table.pair_id[i])
                try:
                    text = extractor.mllm_prompt(table.caption[i], tid)
                except PromptTextError as err:  # holds the MLLM's image placeholder, or too long for it
                    kind = "too_long" if isinstance(err, PromptTooLong) else "bad_prompt"
                    skipped.append({"pair_id": table.pair_id[i], "source": table.source(i), "kind": kind,
                                    "reason": str(err)})
                    continue
                meta = pair_meta(table, i, tid, extractor.template_set, text, extractor.questions_sha256)
                items.append(PairItem(i, table.pair_id[i], table.caption[i], tid, meta, winner, loser))
            yield Chunk(k, extractor.prepare(items) if items else None, skipped)
        yield ShardEnd(k, len(indices))


class _Failure:
    def __init__(self, err: BaseException) -> None:
        self.err = err


_DONE = object()


class _Worker:
    """A daemon thread running ``target`` beside a bounded queue; errors surface in the caller."""

    def __init__(self, name: str, depth: int, target: Callable[[], None]) -> None:
        self.q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=target, name=name, daemon=True)

    def put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def close(self, timeout: float = 30.0) -> None:
        self.stop.set()
        self.thread.join(timeout=timeout)


class Prefetcher(_Worker):
    """Runs an item iterator in a background thread, ``depth`` items ahead."""

    def __init__(self, items: Iterator[Any], depth: int) -> None:
        super().__init__("img-preprocess-prefetch", depth, self._run)
        self.items = items
        self.thread.start()

    def _run(self) -> None:
        try:
            for item in self.items:
                if not self.put(item):
                    return
            self.put(_DONE)
        except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
            self.put(_Failure(err))

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self.q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.err
            yield item


# -- sink -----------------------------------------------------------------------------------------
@dataclass
class ShardSink:
    """Turns (item, features) into shards and reports, in item order."""

    out: Path
    plan: ShardPlan
    cache_key: str
    dtype: torch.dtype
    on_progress: Callable[[int, ShardSink], None] = lambda n, sink: None
    guidance_dtype: Optional[torch.dtype] = None  # None: dtype; float8_e4m3fn: see cache/quant.py
    outlier_channels: int = DEFAULT_OUTLIER_CHANNELS  # with 8-bit guidance: channels kept 16-bit
    locks: Optional[ShardLocks] = None  # shard locks taken by the source, released once written
    shards_written: int = 0
    written: int = 0
    skipped: int = 0
    _writer: Optional[ShardWriter] = None
    _report: dict = field(default_factory=dict)

    def consume(self, item: Any, feats: Optional[list[dict[str, Tensor]]]) -> None:
        name = self.plan.shard_name(item.shard)
        if self._writer is None:
            # Left by an interrupted run of this shard; we hold its lock, so nobody is writing them.
            remove_shard_temporaries(self.out, name)
            self._writer = ShardWriter(self.out / name, self.cache_key)
            self._report = {"shard": name, "planned": 0, "written": 0, "skipped": []}
        report = self._report
        if isinstance(item, Chunk):
            report["skipped"].extend(item.skipped)
            if item.batch is not None:
                for it, tensors in zip(item.batch.items, feats or [], strict=True):
                    try:
                        stored = to_storage(tensors, self.dtype, self.guidance_dtype, it.pair_id, self.outlier_channels)
                    except NonFiniteFeatures as err:
                        report["skipped"].append({"pair_id": it.pair_id, "source": it.meta["source"],
                                                  "kind": "nonfinite", "reason": str(err)})
                        continue
                    self._writer.write(it.pair_id, stored, {**it.meta, "num_tokens": int(stored["guidance"].shape[0])})
                    report["written"] += 1
            self.on_progress((len(item.batch.items) if item.batch else 0) + len(item.skipped), self)
        else:  # ShardEnd: the report first, then the shard (a finished shard always has its report)
            report["planned"] = item.planned
            atomic_write_json(report_path(self.out, name), report)
            self._writer.close()
            self._writer = None
            if self.locks is not None:
                self.locks.release(name)
            self.shards_written += 1
            self.written += report["written"]
            self.skipped += len(report["skipped"])
            self.on_progress(0, self)

    def abort(self) -> None:
        """Drop the shard in progress (its temporary file goes; finished shards stay)."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


class ThreadedSink(_Worker):
    """A :class:`ShardSink` running in its own thread, ``depth`` batches behind the encoders."""

    def __init__(self, sink: ShardSink, depth: int) -> None:
        super().__init__("img-preprocess-writer", depth, self._run)
        self.sink = sink
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                job = self.q.get(timeout=0.2)
            except queue.Empty:
                if self.stop.is_set():
                    return
                continue
            if job is _DONE:
                return
            try:
                self.sink.consume(*job)
            except BaseException as err:  # noqa: BLE001 - re-raised by the producer side
                self.error = err
                self.stop.set()
                return

    def consume(self, item: Any, feats) -> None:
        if self.error is not None:
            raise self.error
        if not self.put((item, feats)) and self.error is not None:
            raise self.error

    def finish(self) -> None:
        """Wait until everything handed over is written; re-raise a writer error."""
        self.put(_DONE)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """After a failure elsewhere: write what was already handed over (shards that complete
        stay complete), then drop the shard in progress."""
        if self.error is None and self.thread.is_alive():
            self.put(_DONE)
            self.thread.join(timeout=600)
        self.close(timeout=5)
        self.sink.abort()
