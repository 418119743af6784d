"""Shepherd's held-out global test split (80 Dolly rows) is scored by the global model.

The harness's scores are tested against per-client loops in test_eval_harness.py; here the
runner's wiring: which rows the ``global_test`` section scores, and that it is absent when the
partition holds out no global split or the method has no global model.
"""

from __future__ import annotations

import collections
import pathlib

import pytest

from fedlora_jax import runner
from fedlora_jax.config import load_config
from fedlora_jax.federated.engine import init_state

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = f"{REPO / 'configs' / 'dolly.py'}:smoke"
TINY_EVAL = ["eval.max_new_tokens=1", "eval.max_examples_per_client=1", "eval.batch_size=8"]


@pytest.fixture(scope="module")
def shepherd():
    cfg = load_config(SMOKE, ["data.partition=shepherd", "data.num_clients=0", *TINY_EVAL])
    setup = runner.build(cfg, verbose=False)
    state = init_state(setup.algorithm, setup.base, len(setup.data.clients), seed=0)
    return cfg, setup, runner.evaluate_state(cfg, setup, state)


def test_global_test_scores_shepherds_80_rows(shepherd) -> None:
    cfg, setup, report = shepherd
    held_out = report["global_test"]
    assert len(setup.data.clients) == 10
    assert held_out["metrics"]["n_examples"] == 80
    # Shepherd's global test set is 10 rows of each of Dolly's 8 categories.
    counts = collections.Counter(
        setup.data.examples[i].category for i in setup.data.global_test.rows
    )
    assert sorted(counts.values()) == [10] * 8
    assert {c: m["n_examples"] for c, m in held_out["by_category"].items()} == dict(counts)
    # It is not one of the clients' test splits (those hold 1 example each here).
    assert report["global"]["metrics"]["n_examples"] == 10
    assert runner.eval_metrics(report)["global_test/loss"] == held_out["metrics"]["loss"]


def test_no_global_test_without_a_held_out_split(shepherd) -> None:
    cfg = load_config(SMOKE, TINY_EVAL)  # Dirichlet: every row belongs to a client
    setup = runner.build(cfg, verbose=False)
    state = init_state(setup.algorithm, setup.base, len(setup.data.clients), seed=0)
    report = runner.evaluate_state(cfg, setup, state)
    assert setup.data.global_test is None and report["global_test"] is None
    assert not any(k.startswith("global_test/") for k in runner.eval_metrics(report))
