"""The ``score`` stage: every configured scorer on every arm's images, resumable per image.

Scores go to ``{run}/scores/{arm}/{metric}.{chunk}.jsonl``: ``{"uid", "score", "scorer",
"image_sha256"}`` per line (``score`` is ``null`` for an image the metric could not score, e.g. an
unparseable MLLM answer). ``scorer`` is the fingerprint of the scorer's full description (model,
checkpoint sha256, version, options: :func:`scorer_fingerprint`) and ``image_sha256`` the scored
file's: a score is reused only while both still match, so a changed scorer or a regenerated image
is scored again, never reported under the new one. Adding a scorer to a finished run only computes
the new column. The descriptions of every metric ever scored in the run are merged into
``scores/metrics.json`` (the report refuses a metric that has none). A scorer that keeps per-image
records (the MLLM grader's answers) has them written beside, to
``{run}/scores/{arm}/answers/{metric}.{chunk}.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from tqdm.auto import tqdm

from ..atomic import append_jsonl, atomic_write
from ..config.eval import EvalConfig
from ..errors import NonFiniteError
from ..eval_run import ImageStore, PromptRecord
from ..hashing import file_sha256_once
from .scorers import Scorer, build_scorers, scorer_name

_COSMETIC = ("label",)  # description keys that do not change a score


def scorer_fingerprint(description: Mapping[str, Any]) -> str:
    """sha256 over a scorer's description (everything but its column label)."""
    data = {k: v for k, v in description.items() if k not in _COSMETIC}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def image_hashes(store: ImageStore, uids: Sequence[str]) -> dict[str, str]:
    """sha256 of each stored image file of ``uids`` (those that exist)."""
    return {u: file_sha256_once(store.path_for(u)) for u in uids if store.path_for(u).is_file()}


def _records(folder: Path, pattern: str) -> Iterator[dict[str, Any]]:
    """The JSON lines of ``folder/pattern`` files in order (a line cut by a kill is skipped)."""
    for f in sorted(folder.glob(pattern)):
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def score_records(run_dir: str | Path, arm: str, metric: str, fingerprint: Optional[str] = None,
                  images: Optional[Mapping[str, str]] = None) -> dict[str, dict[str, Any]]:
    """uid -> the last score record. With ``fingerprint`` / ``images`` (uid -> image sha256) only
    the records made by that scorer on those very images count."""
    out: dict[str, dict[str, Any]] = {}
    for rec in _records(Path(run_dir) / "scores" / arm, f"{metric}.*.jsonl"):
        if fingerprint is not None and rec.get("scorer") != fingerprint:
            continue
        if images is not None and rec.get("image_sha256") != images.get(rec["uid"]):
            continue
        out[rec["uid"]] = rec
    return out


def read_scores(run_dir: str | Path, arm: str, metric: str, fingerprint: Optional[str] = None,
                images: Optional[Mapping[str, str]] = None) -> dict[str, float]:
    """uid -> score (NaN: the scorer abstained), from :func:`score_records`."""
    return {u: float("nan") if r.get("score") is None else float(r["score"])
            for u, r in score_records(run_dir, arm, metric, fingerprint, images).items()}


def merge_descriptions(run_dir: str | Path, scorers: Mapping[str, Scorer]) -> dict[str, Any]:
    """Add (or update) these scorers' descriptions in ``scores/metrics.json``, keeping the others'."""
    path = Path(run_dir) / "scores" / "metrics.json"
    described = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    described.update({n: s.describe() for n, s in scorers.items()})
    atomic_write(path, json.dumps(described, indent=2, default=str))
    return described


def read_answers(run_dir: str | Path, arm: str, metric: str) -> list[dict[str, Any]]:
    """The per-image records a scorer kept (``[]`` for metrics that keep none); the last per uid."""
    out = {rec["uid"]: rec for rec in _records(Path(run_dir) / "scores" / arm / "answers", f"{metric}.*.jsonl")}
    return list(out.values())


def _check_finite(scorer: Scorer, arm: str, uids: Sequence[str], values: Sequence[float]) -> None:
    """NaN is "no score" only for a scorer that may abstain (the MLLM grader); any other NaN or an
    Inf is a broken computation (e.g. float16 overflow) and stops the stage."""
    for uid, v in zip(uids, values, strict=True):
        if math.isinf(v) or (math.isnan(v) and not scorer.abstains):
            raise NonFiniteError(
                f"{scorer.name}: non-finite score {v} for {arm}/{uid}; rerun this metric with dtype=float32, "
                f"or check the image"
            )


def score_run(
    cfg: EvalConfig,
    prompts: Sequence[PromptRecord],
    run_dir: str | Path,
    arms: Sequence[str],
    tag: str,
    scorers: dict[str, Scorer] | None = None,
    progress: bool = True,
) -> dict[str, dict[str, int]]:
    """Score the finished images of ``prompts`` in every arm; returns counts of new scores. An image
    that is byte for byte one another arm has scored (an arm reusing another's images) takes that
    score (the record says ``reused_from``) instead of being scored again."""
    run_dir = Path(run_dir)
    scorers = scorers if scorers is not None else build_scorers(cfg.scorers)
    cats = {scorer_name(c): set(c.categories) for c in cfg.scorers}
    counts: dict[str, dict[str, int]] = {}
    hashes: dict[str, dict[str, str]] = {}
    for arm in arms:
        store = ImageStore(run_dir, arm, tag, cfg.generation.image_format)
        done = store.done()
        hashes[arm] = image_hashes(store, [p.uid for p in prompts if p.uid in done])
        for name, scorer in scorers.items():
            fingerprint = scorer_fingerprint(scorer.describe())
            have = read_scores(run_dir, arm, name, fingerprint, hashes[arm])
            todo = [
                p for p in prompts
                if p.uid in hashes[arm] and p.uid not in have and (not cats.get(name) or p.category in cats[name])
            ]
            todo = _reuse_scores(run_dir, arm, name, tag, fingerprint, todo, hashes)
            counts.setdefault(arm, {})[name] = len(todo)
            if not todo:
                continue
            out = run_dir / "scores" / arm / f"{name}.{tag}.jsonl"
            size = max(1, scorer.batch_size)
            bar = tqdm(range(0, len(todo), size), desc=f"{arm}/{name}", unit="batch", disable=not progress)
            for i in bar:
                batch = todo[i : i + size]
                images = [store.load(p.uid) for p in batch]
                values = scorer.score(images, [p.text for p in batch]).tolist()
                _check_finite(scorer, arm, [p.uid for p in batch], values)
                records = scorer.pop_records() if hasattr(scorer, "pop_records") else []
                if records:  # before the scores: a score line always has its answer on disk
                    append_jsonl(run_dir / "scores" / arm / "answers" / f"{name}.{tag}.jsonl",
                            [{"uid": p.uid, **r} for p, r in zip(batch, records, strict=True)])
                append_jsonl(out, [{"uid": p.uid, "score": None if math.isnan(v) else v, "scorer": fingerprint,
                                    "image_sha256": hashes[arm][p.uid]} for p, v in zip(batch, values, strict=True)])
    return counts


def _reuse_scores(run_dir: Path, arm: str, name: str, tag: str, fingerprint: str, todo: list[PromptRecord],
                  hashes: Mapping[str, Mapping[str, str]]) -> list[PromptRecord]:
    """Copy, from the arms scored before ``arm``, the scores of images identical to ``arm``'s (same
    prompt, same bytes, same scorer), with the scorer's per-image records; returns what is left to score."""
    left = list(todo)
    for other, other_hashes in hashes.items():
        if other == arm or not left:
            continue
        same = {p.uid: other_hashes[p.uid] for p in left if other_hashes.get(p.uid) == hashes[arm][p.uid]}
        found = score_records(run_dir, other, name, fingerprint, same) if same else {}
        if not found:
            continue
        answers = {r["uid"]: r for r in read_answers(run_dir, other, name) if r["uid"] in found}
        if answers:  # before the scores, as when scoring: a score line always has its answer on disk
            append_jsonl(run_dir / "scores" / arm / "answers" / f"{name}.{tag}.jsonl",
                         [{**answers[u], "reused_from": other} for u in found if u in answers])
        append_jsonl(run_dir / "scores" / arm / f"{name}.{tag}.jsonl",
                     [{**found[u], "reused_from": other} for u in found])
        left = [p for p in left if p.uid not in found]
    return left
