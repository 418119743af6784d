"""Evaluation: batched greedy generation, ROUGE-L / exact match / response loss, global and personal
reports."""

from fedlora_jax.eval.harness import EvalExample, as_example, evaluate, from_tokenized
from fedlora_jax.eval.metrics import best_match, exact_match, normalize_answer, rouge_l
from fedlora_jax.eval.report import ExampleScore, build_report, render_markdown

__all__ = [
    "EvalExample",
    "ExampleScore",
    "as_example",
    "best_match",
    "build_report",
    "evaluate",
    "exact_match",
    "from_tokenized",
    "normalize_answer",
    "render_markdown",
    "rouge_l",
]
