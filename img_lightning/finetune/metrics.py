"""Text metrics of a generated edit instruction against the reference one.

* **exact match** and **token F1** follow SQuAD's official evaluation script: lower case, every
  ASCII punctuation character deleted (``don't`` -> ``dont``, ``black-and-white`` ->
  ``blackandwhite``), the whole words a/an/the removed, whitespace collapsed; token F1 is the F1 of
  the two bags of whitespace tokens.
* **ROUGE-L** is the F-measure (beta = 1) of the longest common subsequence of the two token
  sequences, with the tokenisation of the reference ``rouge-score`` package without stemming:
  lower case, runs of ``[a-z0-9]``.

Every metric is in [0, 1]; as in SQuAD 2.0's script, two texts that are empty after
normalisation score 1, one empty text scores 0.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)  # deleted, not replaced by a space (SQuAD)
_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


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


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence, O(len(a) * len(b)) time, O(len(b)) memory."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_tokens(text: str) -> list[str]:
    return _ROUGE_TOKEN.findall(text.lower())


def rouge_l(prediction: str, reference: str) -> float:
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


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
