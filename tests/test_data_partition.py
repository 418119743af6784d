"""Partitioners: exact covers, seeds, a hand-computed Dirichlet case, Shepherd row for row."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest

from fedlora_jax.data import (
    DataError,
    by_category,
    by_group,
    client_category_table,
    dirichlet,
    iid,
    load_dolly,
    load_natural_instructions,
    shepherd,
    train_test_split,
)
from fedlora_jax.data.partition import allocate_category

# sha256 of Shepherd's split file as published with the data (its README), not computed here.
SHEPHERD_SPLIT_SHA256 = "6ba32a88ce0aa8b4179efb5901db4e5e5ce2ab7e08ce8f8a6af7f57f3a41defb"


@pytest.fixture(scope="module")
def dolly():
    return load_dolly(verbose=False).examples


@pytest.fixture(scope="module")
def categories(dolly):
    return np.array([e.category for e in dolly])


@pytest.fixture(scope="module")
def tasks():
    return np.array([e.group for e in load_natural_instructions(verbose=False).examples])


PARTITIONERS = {
    "iid": lambda c, s: iid(len(c), 8, seed=s),
    "by_category": lambda c, s: by_category(c, 8, categories_per_client=2, seed=s),
    "dirichlet": lambda c, s: dirichlet(c, 8, alpha=0.5, min_size=10, seed=s),
}


def assert_exact_cover(parts, n):
    allrows = np.concatenate(parts)
    assert len(allrows) == n and np.array_equal(np.sort(allrows), np.arange(n))


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_exact_cover_deterministic_seed_dependent(name, categories):
    make = PARTITIONERS[name]
    parts = make(categories, 0)
    assert len(parts) == 8 and all(p.dtype == np.int64 for p in parts)
    assert_exact_cover(parts, len(categories))
    assert all(np.array_equal(a, b) for a, b in zip(parts, make(categories, 0), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, make(categories, 1), strict=True))


def test_by_group_cover_and_task_clients(tasks):
    one_each = by_group(tasks, None, seed=0)
    assert len(one_each) == 16 and all(len(set(tasks[p])) == 1 for p in one_each)
    assert_exact_cover(one_each, len(tasks))
    four = by_group(tasks, 4, seed=0)
    assert_exact_cover(four, len(tasks))
    assert [len(set(tasks[p])) for p in four] == [4, 4, 4, 4]
    other = by_group(tasks, 4, seed=1)
    assert [set(tasks[p]) for p in four] != [set(tasks[p]) for p in other]
    with pytest.raises(DataError, match="data.num_clients=17: only 16 groups"):
        by_group(tasks, 17, seed=0)


def test_by_category_holds_k_categories(categories):
    parts = by_category(categories, 8, categories_per_client=2, seed=0)
    assert [len(set(categories[p])) for p in parts] == [2] * 8
    with pytest.raises(DataError, match="categories_per_client=1: with 4 clients only 4 of 8"):
        by_category(categories, 4, categories_per_client=1, seed=0)


def test_dirichlet_hand_computed_uniform_limit():
    # alpha -> inf makes p = [1/2, 1/2]: cuts at floor(0.5 * 4) = 2 and floor(0.5 * 6) = 3.
    cats = np.array(["a"] * 4 + ["b"] * 6)
    parts = dirichlet(cats, 2, alpha=1e9, min_size=1, seed=3)
    assert [len(p) for p in parts] == [5, 5]
    assert [list(cats[p]) for p in parts] == [["a", "a", "b", "b", "b"]] * 2


def test_dirichlet_allocation_step_by_hand():
    rows = np.arange(10)
    # p = [0.25, 0.25, 0.5]: cumsum * 10 = [2.5, 5, 10] -> cuts [2, 5] -> sizes 2, 3, 5.
    got = allocate_category(rows, np.array([0.25, 0.25, 0.5]), np.zeros(3), cap=10 / 3)
    assert [g.tolist() for g in got] == [[0, 1], [2, 3, 4], [5, 6, 7, 8, 9]]
    # Balancing: client 0 already holds >= N/K rows, so its share goes to the others:
    # p = [0.6, 0.2, 0.2] -> [0, 0.5, 0.5] -> cuts at [0, 2] of 4 rows.
    got = allocate_category(np.arange(4), np.array([0.6, 0.2, 0.2]), np.array([4, 0, 0]), cap=4)
    assert [g.tolist() for g in got] == [[], [0, 1], [2, 3]]


def test_dirichlet_min_size_and_skew(categories):
    skewed = dirichlet(categories, 8, alpha=0.1, min_size=50, seed=0)
    assert min(len(p) for p in skewed) >= 50
    flat = dirichlet(categories, 8, alpha=1000.0, min_size=0, seed=0)
    codes = np.unique(categories, return_inverse=True)[1]

    def share(parts):  # the largest single-category share of any client
        return max(np.bincount(codes[p], minlength=8).max() / len(p) for p in parts)

    assert share(skewed) > 0.5 > share(flat)
    with pytest.raises(DataError, match="data.min_client_size=5000"):
        dirichlet(categories, 8, alpha=0.5, min_size=5000, seed=0)


def test_shepherd_reproduced_row_for_row(resources, read_shipped_lines, dolly):
    clients, global_test = shepherd(np.array([e.source_line for e in dolly]))
    lines = read_shipped_lines("dolly/databricks-dolly-15k.jsonl.gz")
    split = (resources / "data/dolly/shepherd_10client_split.json").read_bytes()
    assert hashlib.sha256(split).hexdigest() == SHEPHERD_SPLIT_SHA256
    ranges = json.loads(split)["ranges"]
    want = {r["split"]: lines[r["start"] : r["end"]] for r in ranges}
    sizes = [1493, 1493, 1493, 1492, 1493, 1493, 1493, 1493, 1494, 1494]  # the README's counts
    assert [len(c) for c in clients] == sizes and len(global_test) == 80
    assert_exact_cover([*clients, global_test], 15011)

    def as_json(rows):
        return [
            json.dumps(
                {
                    "instruction": dolly[i].instruction,
                    "context": dolly[i].context,
                    "response": dolly[i].response,
                    "category": dolly[i].category,
                }
            )
            for i in rows
        ]

    assert as_json(global_test) == want["global_test"]
    for k, rows in enumerate(clients):
        assert as_json(rows) == want[f"local_training_{k}"]
    counts = np.unique([dolly[i].category for i in global_test], return_counts=True)[1]
    assert counts.tolist() == [10] * 8


def test_shepherd_survives_dropped_rows(dolly):
    lines = np.array([e.source_line for e in dolly])
    keep = np.ones(len(lines), bool)
    keep[[0, 100, 2000]] = False
    clients, test = shepherd(lines[keep])
    assert len(test) == 79 and len(clients[0]) == 1492 and len(clients[1]) == 1492
    with pytest.raises(DataError, match="needs the shipped Dolly file"):
        shepherd(np.arange(1, 20000))


def test_train_test_split():
    rows = np.arange(100, 1100)
    train, test = train_test_split(rows, test_fraction=0.1, test_cap=50, seed=0, client_id=3)
    assert len(test) == 50 and len(train) == 950  # 10 % = 100, capped at 50
    assert np.array_equal(np.sort(np.concatenate([train, test])), rows)
    again = train_test_split(rows, test_fraction=0.1, test_cap=50, seed=0, client_id=3)
    assert np.array_equal(test, again[1])
    other = train_test_split(rows, test_fraction=0.1, test_cap=50, seed=0, client_id=4)
    assert not np.array_equal(test, other[1])
    uncapped = train_test_split(rows, test_fraction=0.1, test_cap=0, seed=0, client_id=3)
    assert len(uncapped[1]) == 100  # test_cap=0 means no cap
    small = train_test_split(np.arange(12), test_fraction=0.1, test_cap=50, seed=0, client_id=0)
    assert (len(small[0]), len(small[1])) == (11, 1)
    assert [
        len(x)
        for x in train_test_split(np.arange(1), test_fraction=0.1, test_cap=5, seed=0, client_id=0)
    ] == [1, 0]


def test_category_table_text_and_csv(tmp_path):
    cats = np.array(["b", "a", "b", "c", "a"])
    table = client_category_table([np.array([0, 1, 2]), np.array([3, 4])], cats)
    assert table.categories == ["a", "b", "c"]
    assert table.counts.tolist() == [[1, 2, 0], [1, 0, 1]]
    assert table.to_text().splitlines() == [
        "client  a  b  c  total",
        "     0  1  2  0      3",
        "     1  1  0  1      2",
        " total  2  2  1      5",
    ]
    table.to_csv(tmp_path / "t.csv")
    with open(tmp_path / "t.csv") as f:
        assert list(csv.reader(f)) == [
            ["client", "a", "b", "c"],
            ["0", "1", "2", "0"],
            ["1", "1", "0", "1"],
        ]
