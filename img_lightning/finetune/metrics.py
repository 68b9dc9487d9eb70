"""Text metrics of a generated edit instruction against the reference one.

* **ROUGE-L** is computed by the reference package, ``rouge-score`` (Google Research's
  ``rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)``): the F-measure of the longest common
  subsequence of the two token sequences, tokens being runs of ``[a-z0-9]`` after lower-casing;
  a text without any token scores 0, also against another such text.
* **exact match** and **token F1** are those of SQuAD 2.0's official evaluation script
  (``evaluate-v2.0.py``: ``normalize_answer``, ``compute_exact``, ``compute_f1``), written out
  here because no maintained package exposes them per pair: lower case, every ASCII punctuation
  character deleted (``don't`` -> ``dont``, ``black-and-white`` -> ``blackandwhite``), the whole
  words a/an/the removed, whitespace collapsed; token F1 is the F1 of the two bags of tokens, and
  when either text is empty after normalisation it is 1 if both are, else 0 (the SQuAD 1.1 script
  scores two empty texts 0; otherwise the two agree).

Every metric is in [0, 1].
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)  # deleted, not replaced by a space (SQuAD)


def normalize(text: str) -> str:
    """SQuAD's ``normalize_answer``: lower case, punctuation deleted, articles removed, whitespace collapsed."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge_l_scorer() -> Any:
    from rouge_score import rouge_scorer  # imported on first use: it brings nltk's stemmer module

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of ``prediction`` against ``reference`` (rouge-score, no stemming)."""
    return _rouge_l_scorer().score(reference, prediction)["rougeL"].fmeasure


def score(prediction: str, reference: str) -> dict[str, float]:
    return {"rouge_l": rouge_l(prediction, reference), "token_f1": token_f1(prediction, reference),
            "exact_match": exact_match(prediction, reference)}


def aggregate(per_case: Iterable[dict[str, float]]) -> dict[str, float]:
    """Means over the cases, plus ``n``."""
    rows = list(per_case)
    keys = ("rouge_l", "token_f1", "exact_match")
    out: dict[str, float] = {k: (sum(r[k] for r in rows) / len(rows) if rows else 0.0) for k in keys}
    out["n"] = len(rows)
    return out
