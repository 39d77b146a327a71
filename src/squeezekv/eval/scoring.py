"""Scores of one example and confidence intervals of a cell.

* needle: exact retrieval — the needle's key fact (e.g. ``"7291"``) appears in the answer (case-insensitive).
* QA: SQuAD-style token F1 and exact match after normalisation (lower case, no punctuation, no articles), best over
  the gold answers.
* perplexity: the mean negative log-likelihood per token is the per-example score; a cell's perplexity is
  ``exp(mean NLL)``.

:func:`bootstrap_ci` gives a percentile bootstrap interval of the mean over examples (fixed seed: reproducible).
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize(text: str, articles: bool = True) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed (SQuAD's normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    if articles:
        text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: Sequence[str], articles: bool = True) -> float:
    """1.0 if the normalised prediction equals one normalised gold answer (``articles=False`` keeps "a", e.g. for
    multiple-choice letters)."""
    if not golds:
        raise ValueError("exact_match needs at least one gold answer, got none")
    pred = normalize(prediction, articles)
    return float(any(pred == normalize(g, articles) for g in golds))


def token_f1(prediction: str, golds: Sequence[str], articles: bool = True) -> float:
    """Best token-overlap F1 between the prediction and any gold answer."""
    if not golds:
        raise ValueError("token_f1 needs at least one gold answer, got none")
    pred = normalize(prediction, articles).split()
    best = 0.0
    for gold in golds:
        ref = normalize(gold, articles).split()
        if not pred or not ref:
            best = max(best, float(pred == ref))
            continue
        common = sum((Counter(pred) & Counter(ref)).values())
        if common == 0:
            continue
        p, r = common / len(pred), common / len(ref)
        best = max(best, 2 * p * r / (p + r))
    return best


def contains_key(answer: str, key: str) -> float:
    """1.0 if ``key`` appears in ``answer`` (case-insensitive): exact retrieval of a needle's fact."""
    if not key:
        raise ValueError("needle key must be a non-empty string")
    return float(key.lower() in answer.lower())


def first_answer_line(text: str) -> str:
    """The answer a model gives before it rambles on: its first non-empty line."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("mean of an empty list")
    return sum(values) / len(values)


def bootstrap_ci(
    values: Sequence[float], *, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling examples with replacement)."""
    if not values:
        raise ValueError("bootstrap_ci of an empty list")
    if not 0 < level < 1:
        raise ValueError(f"level={level!r} is out of range: must be in (0, 1)")
    if len(values) == 1:
        return float(values[0]), float(values[0])
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return float(lo), float(hi)
