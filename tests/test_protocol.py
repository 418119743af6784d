"""The comparison protocol: budgets counted from every phase (hand counts), comparisons of
unequal budgets refused, the budget in results.md, and the validation split."""

from __future__ import annotations

import json
import pathlib
import sys
from dataclasses import replace

import numpy as np
import pytest
from transformers import AutoTokenizer

from fedlora_jax import config as config_lib
from fedlora_jax.data import DataConfig, DataError, load_dolly, prepare_federated_data
from fedlora_jax.data.pipeline import validation_split, validation_view
from fedlora_jax.eval.harness import EvalExample
from fedlora_jax.protocol import BudgetMismatch, check_budgets, choose_lr, config_budget, eval_rows
from fedlora_jax.report import write_results

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "dolly.py") + ":smoke"  # 4 clients, 2 rounds x 3 steps x 2 rows
FEDIT = "2 rounds x 4 clients x 3 steps x 2 rows (packed) = 12 steps, 24 rows per round"


def budget(*overrides: str):
    cfg = config_lib.load_config(SMOKE, list(overrides))
    return config_budget(cfg, 4)


def test_budget_counts_every_phase() -> None:
    fedit = budget("algorithm.name=fedit")
    assert fedit.describe() == FEDIT
    assert (fedit.steps_per_client, fedit.rows_per_client) == (3, 6)
    # FedLoRA-Optimizer as published: E_g = E_l = local_steps, twice FedIT's steps and rows.
    unmatched = budget("algorithm.name=fedlora_optimizer")
    assert unmatched.phase_steps == (("global", 3), ("personal", 3))
    assert (unmatched.steps_per_round, unmatched.rows_per_round) == (24, 48)
    matched = budget(
        "algorithm.name=fedlora_optimizer",
        "algorithm.options.global_steps=2",
        "algorithm.options.local_steps_personal=1",
    )
    assert matched.phase_steps == (("global", 2), ("personal", 1))
    assert matched.key() == fedit.key()
    # Ditto splits one phase's 3 steps between its models; Centralised trains one pooled
    # client 4 x 3 steps: both FedIT's budget.
    assert budget("algorithm.name=ditto").key() == fedit.key()
    pooled = budget("algorithm.name=centralized")
    assert (pooled.trainers, pooled.steps_per_client) == (1, 12)
    assert pooled.key() == fedit.key()
    two = budget("algorithm.name=fedit", "federated.clients_per_round=2")
    assert (two.trainers, two.rows_per_round) == (2, 12)
    unpacked = budget("algorithm.name=fedit", "federated.packing=False")
    check_budgets({"fedit": fedit, "ditto": budget("algorithm.name=ditto"), "central": pooled})
    with pytest.raises(BudgetMismatch):
        check_budgets({"packed": fedit, "unpacked": unpacked})


def test_personal_phase_counted_where_it_trains() -> None:
    """FedLoRA-Optimizer with E_g = 2, E_l = 1 on the smoke setting (4 clients, 2 rounds, 2 rows
    a step). every_round: 4 x (2 + 1) = 12 steps, 24 rows in each round, 24 steps in all.
    final: the personal phase trains after the last aggregation only, so round 1 trains
    4 x 2 = 8 steps (16 rows), round 2 4 x 3 = 12 steps (24 rows): 20 steps, 40 rows in all."""
    flo = ("algorithm.name=fedlora_optimizer", "algorithm.options.global_steps=2",
           "algorithm.options.local_steps_personal=1")  # fmt: skip
    final_phase = "algorithm.options.local_phase=final"
    every, final = budget(*flo), budget(*flo, final_phase)
    assert _counts(every) == (12, 24, 12, 24, 24, 48)
    assert _counts(final) == (8, 16, 12, 24, 20, 40)
    assert final.describe() == (
        "2 rounds x 4 clients x (global 2 + personal 1 last round only) steps x 2 rows (packed) "
        "= 8 steps, 16 rows per round (12 steps, 24 rows in the last round)"
    )
    assert every.describe() == FEDIT.replace("x 3 steps", "x (global 2 + personal 1) steps")
    assert final.as_dict()["total_steps"] == 20
    fedit = budget("algorithm.name=fedit")
    check_budgets({"fedit": fedit, "every_round": every})
    with pytest.raises(BudgetMismatch, match="final: .*personal 1 last round only"):
        check_budgets({"fedit": fedit, "final": final})
    # One round: the last round is the only one, so final trains what every_round does.
    one = "federated.rounds=1"
    assert _counts(budget(*flo, one)) == (12, 24, 12, 24, 12, 24)
    assert _counts(budget(*flo, one, final_phase)) == (12, 24, 12, 24, 12, 24)
    assert budget(*flo, one, final_phase).key() == budget("algorithm.name=fedit", one).key()


def _counts(b) -> tuple[int, ...]:
    return (
        b.steps_per_round, b.rows_per_round, b.last_round_steps, b.last_round_rows,
        b.total_steps, b.total_rows,
    )  # fmt: skip


def test_unequal_budgets_are_refused_in_one_line() -> None:
    budgets = {"fedit": budget("algorithm.name=fedit")}
    budgets["fedlora_optimizer"] = budget("algorithm.name=fedlora_optimizer")
    with pytest.raises(BudgetMismatch) as e:
        check_budgets(budgets)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"fedit: {FEDIT}" in msg
    assert (
        "fedlora_optimizer: 2 rounds x 4 clients x (global 3 + personal 3) steps x 2 rows "
        "(packed) = 24 steps, 48 rows per round" in msg
    )


def _run_dir(root: pathlib.Path, name: str, *overrides: str) -> pathlib.Path:
    """A run directory as far as the budget reads it: config.json and clients.csv."""
    run = root / name
    run.mkdir()
    cfg = config_lib.load_config(SMOKE, list(overrides))
    (run / "config.json").write_text(json.dumps(config_lib.to_dict(cfg)))
    (run / "clients.csv").write_text("client,a,b\n" + "".join(f"c{i},1,2\n" for i in range(4)))
    return run


def test_compare_script_refuses_unequal_budgets(tmp_path, capsys) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    import compare

    a = _run_dir(tmp_path, "fedit", "algorithm.name=fedit")
    b = _run_dir(tmp_path, "flo", "algorithm.name=fedlora_optimizer")
    assert compare.main([str(a), str(b), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: budgets differ") and err.count("\n") == 1
    assert f"{a}: {FEDIT}" in err and "(global 3 + personal 3)" in err
    assert not (tmp_path / "cmp").exists()
    args = [str(a), str(b), "--out", str(tmp_path / "cmp"), "--allow_unmatched_budgets"]
    assert compare.main(args) == 0


def _example(*tokens: int) -> EvalExample:
    return EvalExample(tokens[:1], ("ref",), tokens, (0,) + (1,) * (len(tokens) - 1))


def test_eval_rows_identify_the_rows() -> None:
    """Counts per client by hand; the digest is equal for equal rows (other objects) and
    changes with a token, a reference, the order or the split between clients."""
    tests = [[_example(1, 2, 3), _example(4, 5)], [_example(6, 7)]]
    rows = eval_rows(tests, None)
    assert (rows["clients"], rows["global_test"]) == ([2, 1], None)
    assert rows == eval_rows([[_example(1, 2, 3), _example(4, 5)], [_example(6, 7)]], None)
    others = [
        [[_example(1, 2, 3), _example(4, 6)], [_example(6, 7)]],  # one token
        [[_example(4, 5), _example(1, 2, 3)], [_example(6, 7)]],  # the order
        [[_example(1, 2, 3)], [_example(4, 5), _example(6, 7)]],  # the split between clients
        [[_example(1, 2, 3), _example(4, 5)], [replace(_example(6, 7), references=("x",))]],
    ]  # fmt: skip
    digests = {eval_rows(t, None)["sha256"] for t in others} | {rows["sha256"]}
    assert len(digests) == 5
    with_global = eval_rows(tests, [_example(8, 9)])
    assert with_global["global_test"] == 1 and with_global["sha256"] != rows["sha256"]


def _scored(run: pathlib.Path, rows: dict | None) -> pathlib.Path:
    """A finished run: its final_eval.json, with the evaluation-row record ``rows`` (or none,
    as a run from before it was recorded)."""
    final = {"global": None, "personal": None, **({"eval_rows": rows} if rows else {})}
    (run / "final_eval.json").write_text(json.dumps(final))
    return run


def test_compare_script_refuses_other_eval_rows(tmp_path, capsys) -> None:
    """Two methods x two seeds (each seed its own data seed, so its own rows R1 / R2): accepted
    when both methods hold {R1, R2}, refused when one holds R3 instead (other rows, or the
    same count of other rows)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import compare

    r1 = {"clients": [2, 2, 2, 2], "global_test": None, "sha256": "a1"}
    r2 = {**r1, "sha256": "b2"}
    r3 = {**r1, "clients": [2, 2, 2, 1], "sha256": "c3"}
    runs = {
        name: _scored(_run_dir(tmp_path, name, f"algorithm.name={alg}", f"data.seed={seed}"), r)
        for name, alg, seed, r in (
            ("fedit0", "fedit", 0, r1), ("fedit1", "fedit", 1, r2),
            ("fedalt0", "fedalt", 0, r1), ("fedalt1", "fedalt", 1, r2),
        )
    }  # fmt: skip
    out = ["--out", str(tmp_path / "cmp")]
    assert compare.main([*map(str, runs.values()), *out]) == 0
    assert capsys.readouterr().err == ""
    _scored(runs["fedalt1"], r3)
    assert compare.main([*map(str, runs.values()), *out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: evaluation rows differ")
    d = {k: str(v) for k, v in runs.items()}
    assert f"fedit: {d['fedit0']} R1, {d['fedit1']} R2; " in err
    assert f"fedalt: {d['fedalt0']} R1, {d['fedalt1']} R3; " in err
    assert 'R2 = clients=[2, 2, 2, 2] sha256="b2", R3 = clients=[2, 2, 2, 1] sha256="c3";' in err
    assert compare.main([*map(str, runs.values()), *out, "--allow_unmatched_eval_rows"]) == 0
    # The same rows under other seeds of one method are its own business.
    assert compare.main([d["fedit0"], d["fedit1"], *out]) == 0


def test_compare_script_compares_older_runs_by_config(tmp_path, capsys) -> None:
    """Runs without the record (an older final_eval.json, or none) are compared by their data
    config, model and evaluation cap, with one warning line naming them: here a cap of 3 rows
    against the smoke preset's 4."""
    sys.path.insert(0, str(REPO / "scripts"))
    import compare

    a = _scored(_run_dir(tmp_path, "a", "algorithm.name=fedit"), None)
    b = _run_dir(tmp_path, "b", "algorithm.name=fedalt")  # unfinished: no final_eval.json
    out = ["--out", str(tmp_path / "cmp")]
    assert compare.main([str(a), str(b), *out]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {a}, {b}: final_eval.json records no evaluation rows")
    assert err.count("\n") == 1
    c = _scored(
        _run_dir(tmp_path, "c", "algorithm.name=fedalt", "eval.max_examples_per_client=3"), None
    )
    assert compare.main([str(a), str(c), *out]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[1].startswith("error: evaluation rows differ")
    assert "R1 = eval.max_examples_per_client=4, R2 = eval.max_examples_per_client=3;" in err[1]


def test_results_md_states_the_budget(tmp_path) -> None:
    run = _run_dir(tmp_path, "r", "algorithm.name=fedit")
    assert f"| budget per round | {FEDIT} |" in write_results(run).read_text()


def test_choose_lr_on_validation_scores() -> None:
    assert choose_lr({1e-3: 2.5, 3e-3: 2.4, 1e-2: float("nan")}) == 3e-3
    assert choose_lr({1e-3: 2.4, 3e-3: 2.4}) == 1e-3  # a tie goes to the smaller lr
    with pytest.raises(ValueError, match="no learning rate gave a finite validation score"):
        choose_lr({1e-3: float("nan")})


# ----------------------------------------------------------------------------- validation split


def test_validation_split_sizes_and_seed() -> None:
    rows = np.arange(100, 110)
    train, val = validation_split(rows, val_fraction=0.2, seed=0, client_id=3)
    assert len(val) == 2 and len(train) == 8
    assert np.array_equal(np.sort(np.concatenate([train, val])), rows)
    again = validation_split(rows, val_fraction=0.2, seed=0, client_id=3)
    assert np.array_equal(again[1], val)
    others = [validation_split(rows, val_fraction=0.2, seed=s, client_id=3)[1] for s in range(5)]
    assert any(not np.array_equal(v, val) for v in others)
    assert len(validation_split(rows[:2], val_fraction=0.01, seed=0, client_id=0)[1]) == 1
    assert len(validation_split(rows[:1], val_fraction=0.5, seed=0, client_id=0)[0]) == 1
    assert len(validation_split(rows, val_fraction=0.0, seed=0, client_id=0)[1]) == 0
    with pytest.raises(DataError, match=r"data.val_fraction=1.0: must be in \[0, 1\)"):
        DataConfig(val_fraction=1.0)


@pytest.fixture(scope="module")
def small_dolly(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("data") / "dolly_small.jsonl"
    fields = ("instruction", "context", "response", "category")
    rows = load_dolly(verbose=False).examples[::50]  # 301 rows
    path.write_text("".join(json.dumps({f: getattr(e, f) for f in fields}) + "\n" for e in rows))
    return path


def test_validation_split_is_disjoint_and_deterministic(small_dolly, stories_dir, capsys) -> None:
    tok = AutoTokenizer.from_pretrained(stories_dir)
    cfg = {
        "source": "path", "path": str(small_dolly), "num_clients": 4, "min_client_size": 5,
        "max_seq_len": 256, "test_cap": 4, "val_fraction": 0.2, "seed": 0,
    }  # fmt: skip
    fd = prepare_federated_data(cfg, tok)
    printed = capsys.readouterr().out
    none = prepare_federated_data({**cfg, "val_fraction": 0.0}, tok, verbose=False)
    for c, c0 in zip(fd.clients, none.clients, strict=True):
        train, val, test = c.train_rows, c.val.rows, c.test.rows
        assert len(val) >= 1
        assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
        assert np.array_equal(test, c0.test.rows)  # the test split does not move
        assert np.array_equal(np.sort(np.concatenate([train, val])), c0.train_rows)
        assert np.array_equal(c.val.full.row_ids, val) and np.array_equal(
            c.val.prompts.row_ids, val
        )
        assert c0.val is None
    n = [sum(len(x) for x in xs) for xs in zip(*[(c.train_rows, c.val.rows, c.test.rows)
                                                 for c in fd.clients], strict=True)]  # fmt: skip
    assert f"train {n[0]}, validation {n[1]}, test {n[2]} rows" in printed
    again = prepare_federated_data(cfg, tok, verbose=False)
    assert [c.val.rows.tolist() for c in again.clients] == [c.val.rows.tolist() for c in fd.clients]
    other = prepare_federated_data({**cfg, "seed": 1}, tok, verbose=False)
    assert [c.val.rows.tolist() for c in other.clients] != [c.val.rows.tolist() for c in fd.clients]
    view = validation_view(fd)
    assert [c.test.rows.tolist() for c in view.clients] == [c.val.rows.tolist() for c in fd.clients]
    assert [c.train_rows.tolist() for c in view.clients] == [
        c.train_rows.tolist() for c in fd.clients
    ]
    with pytest.raises(DataError, match="data.val_fraction=0: no validation split"):
        validation_view(none)
