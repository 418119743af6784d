"""Metrics on hand-checked strings: expected values worked out by hand (LCS-based P/R/F)."""

from __future__ import annotations

import math

import pytest

from fedlora_jax.eval.metrics import (
    best_match,
    exact_match,
    mean_token_loss,
    normalize_answer,
    perplexity,
    rouge_l,
)


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r)


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        # LCS = the cat on the mat (5) of 6 and 6 tokens: P = R = 5/6.
        ("the cat sat on the mat", "the cat is on the mat", 5 / 6),
        # LCS = a c (2); P = 2/4, R = 2/3.
        ("a b c d", "a c e", _f1(2 / 4, 2 / 3)),
        # Order matters (a bag of words would give 1): LCS = 1 of 2 and 2.
        ("b a", "a b", 0.5),
        # Tokenizer lowercases and drops punctuation.
        ("Hello, World!", "hello world", 1.0),
        # Porter stemmer: killed -> kill, so all 4 tokens match.
        ("police killed the gunman", "police kill the gunman", 1.0),
        ("", "anything at all", 0.0),
        ("something", "", 0.0),
        ("cat", "dog", 0.0),
    ],
)
def test_rouge_l_hand_checked(prediction: str, reference: str, expected: float) -> None:
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12)


def test_rouge_l_precision_recall_roles() -> None:
    # pred 2 tokens, ref 4 tokens, LCS 2: P = 1, R = 1/2 -> F = 2/3 (either order gives F, but a
    # longer prediction with the same LCS must score lower).
    assert rouge_l("x y", "x y z w") == pytest.approx(2 / 3)
    assert rouge_l("x y q q q q", "x y z w") == pytest.approx(_f1(2 / 6, 2 / 4))


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("The Eiffel Tower.", "eiffel tower"),
        ("  An   apple, please!  ", "apple please"),
        ("theory of a thing", "theory of thing"),
        ("", ""),
    ],
)
def test_normalize_answer(text: str, normalised: str) -> None:
    assert normalize_answer(text) == normalised


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("The Eiffel Tower.", "eiffel tower", 1.0),
        ("an apple", "Apple", 1.0),
        ("apples", "apple", 0.0),
        ("theory", "ory", 0.0),
        ("Paris, France", "Paris France", 1.0),
        ("Paris", "Paris France", 0.0),
    ],
)
def test_exact_match(prediction: str, reference: str, expected: float) -> None:
    assert exact_match(prediction, reference) == expected


def test_best_match_takes_the_max_per_metric() -> None:
    # ROUGE-L: vs "a red bus" LCS 1 of 2 and 3 -> F = 0.4; vs "the red car" (ROUGE keeps the
    # article) LCS 2 of 2 and 3 -> P = 1, R = 2/3, F = 0.8. EM: "The red car." normalises to
    # "red car" -> 1.
    rouge, em = best_match("red car", ["a red bus", "The red car."])
    assert rouge == pytest.approx(0.8) and em == 1.0
    rouge, em = best_match("red car", ["a red bus", "blue"])
    assert rouge == pytest.approx(_f1(1 / 2, 1 / 3)) and em == 0.0
    with pytest.raises(ValueError, match="references is empty"):
        best_match("x", [])


def test_mean_token_loss_is_token_weighted() -> None:
    loss, n = mean_token_loss([(2.0, 2), (6.0, 4)])
    # Token-weighted: 8 / 6, not the mean of per-example means (1 + 1.5) / 2.
    assert loss == pytest.approx(8 / 6)
    assert n == 6
    assert perplexity(loss) == pytest.approx(math.exp(8 / 6))


def test_mean_token_loss_edge_cases() -> None:
    loss, n = mean_token_loss([])
    assert math.isnan(loss) and n == 0
    assert perplexity(1e6) == math.inf
    with pytest.raises(ValueError, match="n_tokens"):
        mean_token_loss([(1.0, -1)])
