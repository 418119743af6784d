"""Per-example text metrics and loss aggregation.

ROUGE-L uses Google's ``rouge-score`` package (the reference implementation most instruction-tuning
papers report) with ``use_stemmer=True``: Porter stemming makes "runs"/"running" match "run", so
a correct answer is not penalised for inflection. Its tokenizer lowercases and keeps only
``[a-z0-9]`` runs, so punctuation and non-ASCII characters never count.

Exact match follows the SQuAD v1.1 evaluation script: lowercase, drop ASCII punctuation, drop the
articles a/an/the, collapse whitespace; then compare strings.
"""

from __future__ import annotations

import functools
import math
import re
import string
from collections.abc import Iterable, Sequence

from rouge_score import rouge_scorer

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@functools.cache
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (LCS-based) of ``prediction`` against ``reference``; 0 when either is empty."""
    return float(_scorer().score(reference, prediction)["rougeL"].fmeasure)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lowercase, strip punctuation, articles and extra whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def best_match(prediction: str, references: Sequence[str]) -> tuple[float, float]:
    """(ROUGE-L F1, exact match), each the max over ``references`` (SQuAD / Natural Instructions
    convention: a prediction is as good as its closest acceptable answer)."""
    if not references:
        raise ValueError("best_match: references is empty")
    return (
        max(rouge_l(prediction, ref) for ref in references),
        max(exact_match(prediction, ref) for ref in references),
    )


def mean_token_loss(pairs: Iterable[tuple[float, int]]) -> tuple[float, int]:
    """Pool ``(sum_nll, n_tokens)`` pairs into (mean NLL per response token, total tokens).

    Token-weighted on purpose: a long response contributes in proportion to its tokens, the same
    weighting the training loss uses. NaN when there are no tokens.
    """
    total_nll, total_tokens = 0.0, 0
    for sum_nll, n_tokens in pairs:
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        total_nll += float(sum_nll)
        total_tokens += int(n_tokens)
    return (total_nll / total_tokens if total_tokens else math.nan), total_tokens


def perplexity(mean_nll: float) -> float:
    """exp(mean NLL per token); inf on overflow rather than an exception."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf
