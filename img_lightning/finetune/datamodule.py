"""The DataModule of the MLLM finetuning stage: index, split, rank plan, exact resume, skip counts.

Rank plans, exact resume and rank/world come from the data stack's
:class:`~img_lightning.data.resumable.ResumableDataModule`, as for the aligner; what is particular
here is what a sample is (a parquet row turned into tokens), the epoch ordering (row-group windows,
:mod:`.plan`) and the held-out batches padded to the same count on every rank (FSDP). The checkpoint
also holds the index fingerprint and the training-set size: a resume on other data (which would
change which samples the remaining steps see) is refused, as is one under another rank layout.

What the run read, skipped and trained on is counted over all ranks at every optimizer step
(:mod:`.accounting`) and checkpointed here, so a resumed run continues the counts and the
``data.max_bad_fraction`` rule (which applies from the first step) sees the whole run.

Skipped samples (corrupt image, over-long, image placeholder in the text) are appended by each
rank to ``RUN/skipped/rank{r}.jsonl`` (split, epoch, key, reason) when the batch is trained on or
evaluated; :func:`skip_summary` merges the ranks' files (a resumed run re-reads some batches, so
entries are unique per split, epoch and key) for the run summary.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.utilities import rank_zero_info

from ..config.encoders import MLLMConfig
from ..config.finetune_mllm import FinetuneDataConfig
from ..data.plan import Plan, RankPlan
from ..data.resumable import AllSum, ResumableDataModule
from ..errors import UserError
from .accounting import SampleCounts
from .loader import TripletBatchLoader
from .plan import RowGroupWindows
from .samples import IGNORE, SampleEncoder
from .triplets import RowGroupImages, TripletIndex, scan_triplets

log = logging.getLogger(__name__)
WARN_FIRST = 10  # skipped samples logged one by one per rank; the rest only in RUN/skipped/


class ResumeMismatchError(UserError, ValueError):
    """The checkpoint was trained on other data or another rank layout."""


class TooManyBadSamples(UserError, RuntimeError):
    """More unusable samples than ``data.max_bad_fraction`` allows."""


class NothingTrained(UserError, RuntimeError):
    """The run ended without one trained sample: its weights are the base model's."""


class EditTripletDataModule(ResumableDataModule[FinetuneDataConfig]):
    def __init__(self, data_cfg: FinetuneDataConfig, mllm_cfg: MLLMConfig, skip_dir: Optional[Path] = None,
                 encoder: Optional[SampleEncoder] = None, progress: bool = False,
                 record_path: Optional[Path] = None) -> None:
        """``data_cfg``/``mllm_cfg``: the ``data`` and ``mllm`` blocks of the finetuning config;
        ``skip_dir``: where each rank lists its skipped samples (None: nowhere); ``record_path``:
        where rank 0 records every sample's key, location, split and question (None: nowhere)."""
        super().__init__(data_cfg)
        self.mllm_cfg = mllm_cfg
        self.skip_dir = Path(skip_dir) if skip_dir is not None else None
        self.record_path = Path(record_path) if record_path is not None else None
        self.encoder = encoder
        self.progress = progress
        self.index: Optional[TripletIndex] = None
        self.images: Optional[RowGroupImages] = None
        self.counts = SampleCounts()  # checkpointed: read / skipped / trained over all ranks
        self._warned: set[str] = set()  # sample keys already logged (a bad sample recurs every epoch)

    # ------------------------------------------------------------------ setup
    def setup(self, stage: Optional[str] = None) -> None:
        if self.index is not None:
            return
        cfg = self.cfg
        self.index = scan_triplets(cfg.input, cfg.heldout_fraction, cfg.heldout_salt, progress=self.progress)
        if self.encoder is None:
            self.encoder = SampleEncoder.from_config(self.mllm_cfg, cfg.max_length)
        self.images = RowGroupImages(self.index.files, capacity=cfg.row_group_cache)
        train = self.index.train_ids
        if cfg.limit is not None:
            train = train[: int(cfg.limit)]
        self.train_ids = train
        val = self.index.heldout_ids
        self.val_ids = val[: int(cfg.heldout_limit)] if cfg.heldout_limit is not None else val
        world = self._world_size()
        if len(self.train_ids) < cfg.batch_size * world:
            raise UserError(f"data.input={cfg.input}: {len(self.train_ids)} training samples cannot fill one batch of "
                            f"{cfg.batch_size} on each of {world} ranks ({self._scan_counts()})")
        if self.record_path is not None and self._rank() == 0:
            write_sample_record(self.record_path, self.index, self.encoder)
        rank_zero_info(self.describe())

    def _scan_counts(self) -> str:
        """What the scan kept and why it dropped the rest (the reason a set can be empty)."""
        assert self.index is not None
        s = self.index.stats
        limit = f" and {self.num_train} used (data.limit={self.cfg.limit})" if self.cfg.limit is not None else ""
        return (f"{s.rows_read} rows read in {s.files} files: {s.empty_instructions} with an empty edit_prompt, "
                f"{s.empty_prompts} with an empty edited_prompt and {s.placeholder_in_text} with an image placeholder "
                f"in their text were dropped; {s.kept} kept, of which {s.heldout} held out "
                f"(data.heldout_fraction={self.cfg.heldout_fraction}){limit}")

    # ------------------------------------------------------------------ loaders
    def _loader(self, plan: Plan) -> TripletBatchLoader:
        assert self.index is not None and self.images is not None and self.encoder is not None
        return TripletBatchLoader(self.index, self.images, self.encoder, plan,
                                  num_workers=self.cfg.num_workers, prefetch=self.cfg.prefetch_batches)

    def train_dataloader(self) -> TripletBatchLoader:
        assert self.index is not None and self.train_ids is not None, "call setup() first"
        self.train_loader = self._loader(self.train_plan(RowGroupWindows(self.index.group_of, self.cfg.shuffle_window)))
        return self.train_loader

    def val_dataloader(self) -> TripletBatchLoader | list:
        if self.val_ids is None or len(self.val_ids) == 0:
            return []
        return self._loader(self.eval_plan(self.val_ids, pad=True))  # same batches on every rank (FSDP)

    def check_batch(self, max_samples: int = 4) -> Optional[dict[str, Any]]:
        """A held-out batch of the first ``max_samples`` held-out samples, model inputs and labels
        only: what the export's LoRA merge check runs on (small: an export may run on CPU). None
        without held-out samples."""
        if self.val_ids is None or len(self.val_ids) == 0:
            return None
        plan = RankPlan(self.val_ids[:max_samples], batch_size=max_samples, rank=0, world_size=1, shuffle=False)
        batch = self._loader(plan).read_batch(next(iter(plan)))
        return {k: v for k, v in batch.items() if k not in ("keys", "skipped", "epoch", "position")}

    # ------------------------------------------------------------------ skips and counts
    def on_batch(self, batch: dict[str, Any], training: bool) -> dict[str, Any]:
        skipped = batch.pop("skipped", [])
        if training:
            tokens = int((batch["labels"][:, 1:] != IGNORE).sum())  # what the loss is taken over
            self.counts.note(int(batch["num_requested"]), [item["reason"] for item in skipped],
                             int(batch["num_real"]), tokens)
        self._list_skipped(skipped, "train" if training else "heldout", int(batch["epoch"]))
        return batch

    @property
    def samples_read(self) -> int:
        return self.counts.read

    @property
    def samples_skipped(self) -> int:
        return self.counts.skipped

    @property
    def skip_counts(self) -> Counter:
        return self.counts.reasons

    def settle_step(self, all_sum: AllSum) -> int:
        """At an optimizer step: add every rank's counts since the last step (``all_sum``: element-wise
        sum over ranks), stop when the bad share passes ``data.max_bad_fraction``; returns the step's
        answer tokens over all ranks."""
        tokens = self.counts.settle(all_sum)
        planned = self.planned_reads()
        bound = self.counts.bad_share_bound(planned)
        if bound > self.cfg.max_bad_fraction:
            c = self.counts
            raise TooManyBadSamples(
                f"{self.cfg.input}: {c.skipped} of the {c.read} training samples read so far were unusable "
                f"({c.reasons_text()}); "
                f"that is already {bound:.2%} of the {max(c.read, planned)} this run reads by the end of its epoch, "
                f"above data.max_bad_fraction={self.cfg.max_bad_fraction}. See {self.skip_dir or 'the log'} for which "
                f"and why; repair the data, or raise data.max_bad_fraction to train on the rest")
        return tokens

    def check_trained(self) -> None:
        """Refuse a run that ended without one trained sample (its weights are the base model's)."""
        c = self.counts
        if c.trained > 0:
            return
        raise NothingTrained(
            f"{self.cfg.input}: no sample was trained on in {c.steps} optimizer steps: {c.skipped} of the {c.read} "
            f"training samples read were unusable ({c.reasons_text()}; listed in {self.skip_dir or 'the log'}). "
            f"Nothing was exported: the weights are the base model's. Repair the data and start a new run")

    def _list_skipped(self, skipped: list[dict], split: str, epoch: int) -> None:
        if not skipped:
            return
        if self.skip_dir is not None:
            self.skip_dir.mkdir(parents=True, exist_ok=True)
            with open(self.skip_dir / f"rank{self._rank()}.jsonl", "a", encoding="utf-8") as fh:
                for item in skipped:
                    fh.write(json.dumps({"split": split, "epoch": epoch, **item}) + "\n")
        for item in skipped:
            # The first few samples per rank are worth a line each, once; the rest are in the skip list
            # and the summary.
            if item["key"] in self._warned:
                continue
            self._warned.add(item["key"])
            level = logging.WARNING if len(self._warned) <= WARN_FIRST else logging.DEBUG
            log.log(level, "skipped %s sample %s: %s (%s)%s", split, item["key"], item["reason"], item["detail"],
                    f"; further skips are listed in {self.skip_dir} only" if len(self._warned) == WARN_FIRST else "")

    # ------------------------------------------------------------------ checkpoint state
    def extra_state(self) -> dict[str, Any]:
        return {"fingerprint": self.index.fingerprint if self.index is not None else None,
                "train_samples": int(len(self.train_ids)) if self.train_ids is not None else None,
                **self.counts.state()}

    def restore_extra(self, state: dict[str, Any]) -> None:
        self.counts.restore(state)

    def resume_problems(self, state: dict[str, Any]) -> list[str]:
        problems = []
        if self.index is not None and state.get("fingerprint") not in (None, self.index.fingerprint):
            problems.append(f"the data differs (index fingerprint {state['fingerprint'][:12]}... in the checkpoint, "
                            f"{self.index.fingerprint[:12]}... now)")
        if self.train_ids is not None and state.get("train_samples") not in (None, len(self.train_ids)):
            problems.append(f"the training set has {len(self.train_ids)} samples, the checkpoint's had "
                            f"{state['train_samples']}")
        return problems

    def resume_refused(self, problems: list[str]) -> Exception:
        return ResumeMismatchError("cannot resume exactly: " + "; ".join(problems) +
                                   ". Resume with the same data and ranks, or start a new run (another run.name).")

    # ------------------------------------------------------------------ info
    def describe(self) -> str:
        if self.index is None:
            return "data not set up"
        s = self.index.stats
        return (f"edit triplets {self.cfg.input}: {s.rows_read} rows in {s.files} files, {s.kept} kept "
                f"({s.empty_instructions} empty instructions, {s.empty_prompts} empty prompts, "
                f"{s.placeholder_in_text} with an image placeholder dropped); train {self.num_train}, "
                f"held-out {s.heldout} ({self.num_val} for val/loss); {self.steps_per_epoch} batches/epoch at "
                f"{self.cfg.batch_size} x {self._world_size()} ranks; fingerprint {self.index.fingerprint[:12]}")


def skip_summary(skip_dir: Path) -> dict[str, dict[str, int]]:
    """``{split: {reason: count}}`` over every rank's skip list; an entry counts once per split,
    epoch and key (batches re-read after a resume are listed again), held-out ones once per key."""
    seen: set = set()
    counts: dict[str, Counter] = {"train": Counter(), "heldout": Counter()}
    for path in sorted(Path(skip_dir).glob("rank*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            ident = (item["split"], item["epoch"] if item["split"] == "train" else 0, item["key"])
            if ident in seen:
                continue
            seen.add(ident)
            counts.setdefault(item["split"], Counter())[item["reason"]] += 1
    return {split: dict(c) for split, c in counts.items()}


def write_sample_record(path: Path, index: TripletIndex, encoder: SampleEncoder) -> Path:
    """``samples.parquet``: per kept triplet its key, parquet file / row group / row, split and the
    index of the question it is asked with (a pure function of the key and the question set, so the
    record is the same on every rank and in every resume), plus the question set's sha256."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..atomic import atomic_path

    questions = encoder.questions
    table = pa.table({
        "key": pa.array(index.keys, pa.string()),
        "file": pa.array([Path(index.files[i]).name for i in index.file_index.tolist()], pa.string()),
        "row_group": pa.array(index.row_group, pa.int32()),
        "row": pa.array(index.row, pa.int64()),
        "heldout": pa.array(index.heldout, pa.bool_()),
        "question_index": pa.array([questions.index_for(k) for k in index.keys], pa.int32()),
    }).replace_schema_metadata({"questions_sha256": questions.sha256, "questions_name": questions.name,
                                "fingerprint": index.fingerprint})
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path
