"""Sensitivity metrics (paper Fig. 1) against plain numpy, and the script end to end on
stories260K."""

from __future__ import annotations

import itertools
import json
import pathlib
import sys

import numpy as np
import pytest

from fedlora_jax.analysis.sensitivity import (
    direction_change,
    magnitude_change,
    module_sensitivity,
    ratios,
    tree_sensitivity,
)

REPO = pathlib.Path(__file__).resolve().parents[1]


def random_leaf(rng, r=3, n_in=5, n_out=4, axis="row"):
    if axis == "row":
        return {
            "A_M": rng.normal(size=r),
            "A_D": rng.normal(size=(r, n_in)),
            "B_M": rng.normal(size=n_out),
            "B_D": rng.normal(size=(n_out, r)),
        }
    return {
        "A_M": rng.normal(size=n_in),
        "A_D": rng.normal(size=(r, n_in)),
        "B_M": rng.normal(size=r),
        "B_D": rng.normal(size=(n_out, r)),
    }


def np_dir(d1, d2, axis):
    """1 - cos per vector, one vector at a time (rows: axis 1, columns: axis 0)."""
    vecs = zip(d1 if axis == 1 else d1.T, d2 if axis == 1 else d2.T, strict=True)
    return np.mean([1 - u @ v / (np.linalg.norm(u) * np.linalg.norm(v)) for u, v in vecs])


def test_hand_worked_example():
    # rows: identical (1 - cos = 0) and orthogonal (1 - cos = 1) -> mean 0.5
    got = direction_change([[1.0, 0.0], [0.0, 2.0]], [[3.0, 0.0], [5.0, 0.0]], 1)
    assert got == pytest.approx(0.5)
    # columns: same direction (0) and opposite (1 - (-1) = 2) -> mean 1
    got = direction_change([[1.0, 0.0], [0.0, 2.0]], [[2.0, 0.0], [0.0, -1.0]], 0)
    assert got == pytest.approx(1.0)
    assert magnitude_change([1.0, -2.0], [0.5, 1.0]) == pytest.approx(1.75)


@pytest.mark.parametrize("axis", ["row", "col"])
def test_module_sensitivity_matches_numpy(axis):
    rng = np.random.default_rng(0)
    leaves = [random_leaf(rng, axis=axis) for _ in range(3)]
    got = module_sensitivity(leaves, axis)
    ax = 1 if axis == "row" else 0
    pairs = list(itertools.combinations(leaves, 2))
    want = {
        "dir_A": np.mean([np_dir(a["A_D"], b["A_D"], ax) for a, b in pairs]),
        "dir_B": np.mean([np_dir(a["B_D"], b["B_D"], ax) for a, b in pairs]),
        "mag_A": np.mean([np.abs(a["A_M"] - b["A_M"]).mean() for a, b in pairs]),
        "mag_B": np.mean([np.abs(a["B_M"] - b["B_M"]).mean() for a, b in pairs]),
    }
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-5), k
    # the same direction at another scale has no direction change
    scaled = {**leaves[0], "A_D": 7.0 * leaves[0]["A_D"]}
    assert module_sensitivity([leaves[0], scaled], axis)["dir_A"] == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="needs adapters from >= 2 tasks"):
        module_sensitivity(leaves[:1], axis)


def test_tree_sensitivity_rows_and_ratios():
    rng = np.random.default_rng(1)
    paths = [("0", "attn", "q_proj"), ("0", "attn", "v_proj"), ("1", "attn", "q_proj")]

    def tree():
        out: dict = {"layers": {}}
        for i, block, name in paths:
            out["layers"].setdefault(i, {}).setdefault(block, {})[name] = random_leaf(rng)
        return out

    trees = [tree(), tree()]
    rows, summary = tree_sensitivity(trees)
    assert [r["module"] for r in rows] == [
        "layers.0.attn.q_proj",
        "layers.0.attn.v_proj",
        "layers.1.attn.q_proj",
    ]
    leaf = trees[1]["layers"]["0"]["attn"]["v_proj"]
    assert rows[1]["mag_B"] == pytest.approx(
        np.abs(trees[0]["layers"]["0"]["attn"]["v_proj"]["B_M"] - leaf["B_M"]).mean(), rel=1e-5
    )
    assert summary["dir_A"] == pytest.approx(np.mean([r["dir_A"] for r in rows]))
    assert summary["dir_A/dir_B"] == pytest.approx(summary["dir_A"] / summary["dir_B"])
    assert summary["mag_B/mag_A"] == pytest.approx(summary["mag_B"] / summary["mag_A"])
    assert ratios({"dir_A": 1.0, "dir_B": 0.0, "mag_A": 0.0, "mag_B": 1.0})["dir_A/dir_B"] == (
        float("inf")
    )


def test_script_on_stories260k(tmp_path, stories_dir):
    sys.path.insert(0, str(REPO / "scripts"))
    import sensitivity as script

    out = tmp_path / "sens"
    code = script.main(
        [
            "--preset",
            "stories260k",
            "--steps",
            "2",
            "--categories",
            "closed_qa,open_qa",
            "--r",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    data = json.loads((out / "sensitivity.json").read_text())
    assert len(data["modules"]) == 2 * 5  # q and v in 5 layers
    assert all(v > 0 for v in (data["summary"][k] for k in ("dir_A", "dir_B", "mag_A", "mag_B")))
    assert (out / "sensitivity.png").stat().st_size > 0
    md = (out / "sensitivity.md").read_text()
    assert "| dir_A/dir_B |" in md and "| 1.7 |" in md
    assert (
        script.main(["--preset", "stories260k", "--categories", "closed_qa", "--out", str(out)])
        == 2
    )
