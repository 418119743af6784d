"""Global/local aggregation on a small hand-made example (expected numbers worked by hand)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedlora_jax.eval.report import ExampleScore, build_report, render_markdown

# client, category, rouge_l, exact_match, sum_nll, n_tokens
ROWS = [
    (0, "qa", 0.2, 0.0, 2.0, 2),
    (0, "sum", 0.4, 1.0, 4.0, 2),
    (1, "qa", 0.9, 1.0, 1.0, 4),
    (2, "sum", 0.1, 0.0, 3.0, 3),
    (2, "sum", 0.1, 0.0, 3.0, 3),
    (2, "qa", 0.4, 0.0, 3.0, 3),
]
SCORES = [ExampleScore(*r) for r in ROWS]


@pytest.fixture(scope="module")
def report() -> dict:
    return build_report(SCORES, SCORES)


def test_global_is_example_weighted(report: dict) -> None:
    g = report["global"]["metrics"]
    assert g["rouge_l"] == pytest.approx(2.1 / 6)  # 0.2+0.4+0.9+0.1+0.1+0.4
    assert g["exact_match"] == pytest.approx(2 / 6)
    assert g["loss"] == pytest.approx(16 / 17)  # token-weighted: (2+4+1+9) / (2+2+4+9)
    assert g["perplexity"] == pytest.approx(math.exp(16 / 17))
    assert (g["n_examples"], g["n_tokens"], report["global"]["n_clients"]) == (6, 17, 3)


def test_local_per_client(report: dict) -> None:
    pc = report["personal"]["per_client"]
    assert sorted(pc) == [0, 1, 2]
    assert [pc[i]["rouge_l"] for i in range(3)] == pytest.approx([0.3, 0.9, 0.2])
    assert [pc[i]["loss"] for i in range(3)] == pytest.approx([6 / 4, 1 / 4, 9 / 9])
    assert [pc[i]["n_examples"] for i in range(3)] == [2, 1, 3]


def test_local_summary_by_hand(report: dict) -> None:
    s = report["personal"]["summary"]
    r = s["rouge_l"]  # per client 0.3, 0.9, 0.2 with 2, 1, 3 examples
    assert r["mean"] == pytest.approx(1.4 / 3)
    assert r["weighted_mean"] == pytest.approx((2 * 0.3 + 0.9 + 3 * 0.2) / 6)
    assert r["worst"] == pytest.approx(0.2)  # higher is better -> min
    # population std: devs (-1/6, 13/30, -4/15), squares sum 0.28666..
    assert r["std"] == pytest.approx(math.sqrt(0.286666666 / 3), rel=1e-6)
    assert r["std"] == pytest.approx(np.std([0.3, 0.9, 0.2]))
    loss = s["loss"]  # per client 1.5, 0.25, 1.0
    assert loss["mean"] == pytest.approx(2.75 / 3)
    assert loss["weighted_mean"] == pytest.approx(6.25 / 6)
    assert loss["worst"] == pytest.approx(1.5)  # lower is better -> max
    assert loss["std"] == pytest.approx(math.sqrt(0.7916666666 / 3), rel=1e-6)
    assert s["perplexity"]["worst"] == pytest.approx(math.exp(1.5))
    assert s["exact_match"]["mean"] == pytest.approx((0.5 + 1 + 0) / 3)


def test_client_weights_override() -> None:
    rep = build_report(None, SCORES, client_weights={0: 1, 1: 1, 2: 2})
    assert rep["global"] is None
    assert rep["personal"]["summary"]["rouge_l"]["weighted_mean"] == pytest.approx(1.6 / 4)
    with pytest.raises(ValueError, match="no entry for clients \\[2\\]"):
        build_report(None, SCORES, client_weights={0: 1, 1: 1})


def test_by_category(report: dict) -> None:
    for section in ("global", "personal"):
        cats = report[section]["by_category"]
        assert sorted(cats) == ["qa", "sum"]
        assert cats["qa"]["rouge_l"] == pytest.approx(1.5 / 3)  # 0.2, 0.9, 0.4
        assert cats["sum"]["rouge_l"] == pytest.approx(0.6 / 3)  # 0.4, 0.1, 0.1
        assert cats["qa"]["loss"] == pytest.approx(6 / 9)
        assert cats["sum"]["loss"] == pytest.approx(10 / 8)
        assert cats["qa"]["n_examples"] == 3


def test_report_is_json_ready_and_validates(report: dict) -> None:
    json.dumps(report)
    assert report["personal"]["adapter"] == "personal"
    assert build_report(None, SCORES, personal_adapter="global")["personal"]["adapter"] == "global"
    with pytest.raises(ValueError, match="personal_adapter='mine'; allowed: personal, global"):
        build_report(None, SCORES, personal_adapter="mine")
    with pytest.raises(ValueError, match="empty"):
        build_report([], None)


def test_render_markdown_shows_the_numbers(report: dict) -> None:
    md = render_markdown(report)
    lines = md.splitlines()
    glob = next(line for line in lines if line.startswith("| global |"))
    assert "0.3500" in glob and f"{16 / 17:.4f}" in glob
    worst = next(line for line in lines if "personal (personal adapter) worst" in line)
    assert "| 0.2000 |" in worst and "| 1.5000 |" in worst
    assert any(line.startswith("| qa | 0.5000 | 0.6667 | 0.5000 | 0.6667 |") for line in lines)
    assert "| 1 | 1 | 0.9000 | 1.0000 | 0.2500 |" in md
    only_personal = render_markdown(build_report(None, SCORES, personal_adapter="global"))
    assert "| global |" not in only_personal and "personal (global adapter) mean" in only_personal
    assert render_markdown({"global": None, "personal": None}) == "_no evaluation results_\n"
