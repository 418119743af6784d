"""Sensitivity metrics (paper Fig. 1) against plain numpy for every protocol, the verdict rule,
and the script end to end on stories260K (both protocols, Dolly and NI)."""

from __future__ import annotations

import itertools
import json
import pathlib
import sys

import numpy as np
import pytest

from fedlora_jax.analysis.sensitivity import (
    agreement,
    direction_change,
    magnitude_change,
    module_sensitivity,
    protocol_leaves,
    ratios,
    relative_magnitude_change,
    tree_sensitivity,
    verdict,
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


def np_rel(m1, m2):
    return np.abs(m1 - m2).mean() / ((np.abs(m1) + np.abs(m2)) / 2).mean()


def np_pairs(leaves, ax, mag_of, dir_of):
    """The six metrics by hand: mag_of(leaf, X) / dir_of(leaf, X) give X's magnitude / direction."""
    pairs = list(itertools.combinations(leaves, 2))
    out = {}
    for x in "AB":
        out[f"dir_{x}"] = np.mean([np_dir(dir_of(a, x), dir_of(b, x), ax) for a, b in pairs])
        out[f"mag_{x}"] = np.mean([np.abs(mag_of(a, x) - mag_of(b, x)).mean() for a, b in pairs])
        out[f"rel_mag_{x}"] = np.mean([np_rel(mag_of(a, x), mag_of(b, x)) for a, b in pairs])
    return out


def test_hand_worked_example():
    # rows: identical (1 - cos = 0) and orthogonal (1 - cos = 1) -> mean 0.5
    got = direction_change([[1.0, 0.0], [0.0, 2.0]], [[3.0, 0.0], [5.0, 0.0]], 1)
    assert got == pytest.approx(0.5)
    # columns: same direction (0) and opposite (1 - (-1) = 2) -> mean 1
    got = direction_change([[1.0, 0.0], [0.0, 2.0]], [[2.0, 0.0], [0.0, -1.0]], 0)
    assert got == pytest.approx(1.0)
    assert magnitude_change([1.0, -2.0], [0.5, 1.0]) == pytest.approx(1.75)
    # |Δ| = (0.5 + 3) / 2 = 1.75 over scale ((1 + 0.5) / 2 + (2 + 1) / 2) / 2 = 1.125
    assert relative_magnitude_change([1.0, -2.0], [0.5, 1.0]) == pytest.approx(1.75 / 1.125)
    # relative change ignores the scale: the same change at 1000x has the same value
    assert relative_magnitude_change([1e3, 2e3], [2e3, 2e3]) == pytest.approx(
        relative_magnitude_change([1.0, 2.0], [2.0, 2.0])
    )
    assert relative_magnitude_change([0.0, 0.0], [0.0, 0.0]) == 0.0


@pytest.mark.parametrize("axis", ["row", "col"])
def test_decomposed_protocol_matches_numpy(axis):
    """decomposed: the learned (signed) M and unnormalised D are scored as they are."""
    rng = np.random.default_rng(0)
    trees = [{"layers": {"0": {"attn": {"q_proj": random_leaf(rng, axis=axis)}}}} for _ in range(3)]
    leaves = [
        protocol_leaves(t, "decomposed", axis)["layers"]["0"]["attn"]["q_proj"] for t in trees
    ]
    got = module_sensitivity(leaves, axis)
    want = np_pairs(
        [t["layers"]["0"]["attn"]["q_proj"] for t in trees],
        1 if axis == "row" else 0,
        mag_of=lambda leaf, x: leaf[f"{x}_M"],
        dir_of=lambda leaf, x: leaf[f"{x}_D"],
    )
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-5), k
    # the same direction at another scale has no direction change
    scaled = {**leaves[0], "A_D": 7.0 * leaves[0]["A_D"]}
    assert module_sensitivity([leaves[0], scaled], axis)["dir_A"] == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="needs adapters from >= 2 tasks"):
        module_sensitivity(leaves[:1], axis)


@pytest.mark.parametrize("axis", ["row", "col"])
def test_lora_protocol_matches_numpy(axis):
    """lora: trained A [r,in], B [out,r] split after training into norms and directions of
    A's and B's rows (row-wise) or columns (col-wise), computed here with np.linalg.norm."""
    rng = np.random.default_rng(2)
    # B ~ 1e-4: young B rows; the split must give their exact norm (no ε floor of 1e-3)
    leaves = [{"A": rng.normal(size=(3, 6)), "B": 1e-4 * rng.normal(size=(5, 3))} for _ in range(3)]
    trees = [{"layers": {"2": {"attn": {"v_proj": leaf}}}} for leaf in leaves]
    ax = 1 if axis == "row" else 0
    rows, summary = tree_sensitivity([protocol_leaves(t, "lora", axis) for t in trees], axis)
    want = np_pairs(
        leaves,
        ax,
        mag_of=lambda leaf, x: np.linalg.norm(leaf[x], axis=ax),
        dir_of=lambda leaf, x: leaf[x],
    )
    assert [r["module"] for r in rows] == ["layers.2.attn.v_proj"]
    for k, v in want.items():
        assert summary[k] == pytest.approx(v, rel=1e-4), k
    split = protocol_leaves(trees[0], "lora", axis)["layers"]["2"]["attn"]["v_proj"]
    np.testing.assert_allclose(split["B_M"], np.linalg.norm(leaves[0]["B"], axis=ax), rtol=1e-5)
    with pytest.raises(ValueError, match="protocol='dora' is not known; allowed: lora, decomp"):
        protocol_leaves(trees[0], "dora", axis)


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
    a, b = (t["layers"]["0"]["attn"]["v_proj"] for t in trees)
    assert rows[1]["mag_B"] == pytest.approx(np.abs(a["B_M"] - b["B_M"]).mean(), rel=1e-5)
    assert rows[1]["rel_mag_A"] == pytest.approx(np_rel(a["A_M"], b["A_M"]), rel=1e-5)
    assert summary["dir_A"] == pytest.approx(np.mean([r["dir_A"] for r in rows]))
    assert summary["dir_A/dir_B"] == pytest.approx(summary["dir_A"] / summary["dir_B"])
    assert summary["mag_B/mag_A"] == pytest.approx(summary["mag_B"] / summary["mag_A"])
    assert summary["rel_mag_B/rel_mag_A"] == pytest.approx(
        summary["rel_mag_B"] / summary["rel_mag_A"]
    )
    zero = {"dir_A": 1.0, "dir_B": 0.0, "mag_A": 0.0, "mag_B": 1.0, "rel_mag_A": 1, "rel_mag_B": 1}
    assert ratios(zero)["dir_A/dir_B"] == float("inf")


def test_agreement_and_verdict():
    # within a factor 2 of the paper and > 1: reproduced; beyond: same side; <= 1: reversed
    assert agreement(1.7, 1.7) == agreement(0.86 * 2, 1.7) == agreement(3.39, 1.7) == "reproduced"
    assert agreement(3.5, 1.7) == agreement(1e3, 41) == "same side"
    assert agreement(0.95, 1.7) == agreement(0.01, 1.7) == agreement(1.0, 41) == "reversed"
    assert agreement(20.6, 41) == agreement(82, 41) == "reproduced"
    good = {"dir_A/dir_B": 2.0, "mag_B/mag_A": 1.2, "rel_mag_B/rel_mag_A": 50.0}
    assert verdict(good).startswith("reproduces 1.7 and 41 (dir A/B: reproduced; ")
    assert "mag B/A abs: same side; mag B/A rel: reproduced" in verdict(good)
    bad = {**good, "dir_A/dir_B": 0.01}
    assert verdict(bad).startswith("does not reproduce 1.7 and 41 (dir A/B: reversed;")


def load_script():
    sys.path.insert(0, str(REPO / "scripts"))
    import sensitivity as script

    return script


def test_script_both_protocols_on_stories260k(tmp_path):
    script = load_script()
    out, summary_path = tmp_path / "sens", tmp_path / "summary.json"
    argv = ["--preset", "stories260k", "--steps", "3", "--tasks", "closed_qa,open_qa", "--r", "2"]
    code = script.main([*argv, "--out", str(out), "--summary", str(summary_path)])
    assert code == 0
    data = json.loads((out / "sensitivity.json").read_text())
    assert sorted(data["results"]) == ["decomposed_row", "lora_col", "lora_row"]
    for res in data["results"].values():
        assert len(res["rows"]) == 2 * 5  # q and v in 5 layers
        assert all(np.isfinite(res["summary"][k]) and res["summary"][k] > 0 for k in res["summary"])
        assert set(res["control"]) == set(res["summary"])  # the within-task control was scored
    # 2 tasks + the control, 3 steps each, every step's loss kept, for both protocols
    assert {k: np.asarray(v).shape for k, v in data["meta"]["losses"].items()} == {
        "lora": (3, 3),
        "decomposed": (3, 3),
    }
    assert set(data["meta"]["seconds"]) == {"lora", "decomposed"}
    summary = json.loads(summary_path.read_text())
    lora = summary["lora_row"]
    assert lora["steps"] == 3
    want = data["results"]["lora_row"]["summary"]["dir_A/dir_B"]
    assert lora["dir_A_over_dir_B"] == pytest.approx(want)
    assert set(lora) >= {"mag_B_over_mag_A_abs", "mag_B_over_mag_A_rel", "verdict"}
    md = (out / "sensitivity.md").read_text()
    assert "| paper (LLaMA2-7B, Dolly) | | | | **1.7** | | | **41** |" in md
    assert "| lora_row |" in md and "| decomposed_row |" in md and "Within-task control" in md
    assert (out / "sensitivity.png").stat().st_size > 0
    assert (out / "loss_curves.png").stat().st_size > 0


def test_script_lora_one_step_on_natural_instructions(tmp_path):
    """After one step from B = 0, A has had zero gradient, so A is still the shared init in
    every task (no direction or magnitude change) while B already differs between tasks."""
    script = load_script()
    out = tmp_path / "ni"
    argv = ["--preset", "stories260k", "--source", "natural_instructions", "--protocol", "lora"]
    assert script.main([*argv, "--steps", "1", "--no-control", "--out", str(out)]) == 0
    data = json.loads((out / "sensitivity.json").read_text())
    assert len(data["meta"]["tasks"]) == 3 and data["meta"]["source"] == "natural_instructions"
    for res in data["results"].values():
        s = res["summary"]
        assert s["mag_A"] == 0.0 and s["dir_A"] == pytest.approx(0.0, abs=1e-6)
        assert s["dir_B"] > 0 and s["mag_B"] > 0
        assert "control" not in res
    assert json.loads((out / "sensitivity_summary.json").read_text()).keys() == {
        "lora_row",
        "lora_col",
    }


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tasks", "closed_qa"], "--tasks needs >= 2 different tasks"),
        (["--tasks", "closed_qa,poetry"], "--tasks: 'poetry' not in dolly; known: "),
        (["--protocol", "lora,dora"], "--protocol='lora,dora': allowed values are lora, decomp"),
    ],
)
def test_script_rejects_bad_lists(tmp_path, capsys, extra, message):
    script = load_script()
    assert script.main(["--preset", "stories260k", *extra, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
