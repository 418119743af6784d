"""The federated-round benchmark runs end to end on a tiny shape, and its pieces are right."""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import federated_round as F  # noqa: E402

from fedlora_jax.model.config import LlamaConfig  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], pathlib.Path]:
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("bench") / "round"
    rows = F.main(
        [
            "--preset",
            "tiny",
            "--clients",
            "2",
            "--steps",
            "2",
            "--rounds",
            "1",
            "--backends",
            "vmap",
            "--in-process",
            "--out",
            str(out),
        ]
    )
    return rows, out


def test_tiny_round_runs_and_writes_table(tiny_run: tuple[list[dict], pathlib.Path]) -> None:
    rows, out = tiny_run
    assert [(r["impl"], r["backend"], r["k"]) for r in rows] == [
        ("jax", "vmap", 2),
        ("torch", "loop", 2),
    ]
    for r in rows:
        assert r["round_s"] > 0 and r["peak_mib"] > 0
        assert r["tokens_per_s"] == pytest.approx(2 * 2 * 2 * 16 / r["round_s"])
    ours = rows[0]
    assert ours["ratio_vs_ref"] == pytest.approx(ours["round_s"] / rows[1]["round_s"])
    saved = json.loads(out.with_suffix(".json").read_text())
    assert len(saved["rows"]) == 2
    table = out.with_suffix(".md").read_text()
    assert "| tiny | ours (vmap) | 2 | 2×2×16 |" in table and "torch+PEFT" in table


def test_reference_computes_the_same_round(tiny_run: tuple[list[dict], pathlib.Path]) -> None:
    """Same weights, data and hyperparameters: after round 1 (2 AdamW steps per client, lr 1e-3,
    FedAvg with unequal weights) the two global adapters agree far below one step's size."""
    ours = tiny_run[0][0]
    assert ours["max_abs_diff_vs_ref"] < 1e-4


def test_flops_per_token_hand_worked() -> None:
    cfg = LlamaConfig(
        vocab_size=10,
        hidden_size=4,
        intermediate_size=8,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=2,
    )
    # frozen N = q 16 + k 8 + v 8 + o 16 + mlp 96 + head 40 = 184; LoRA r=1 on q (4+4), v (4+2)
    # = 14; attention 12·L·T·d_q = 12·1·3·4 = 144
    assert F.flops_per_token(cfg, r=1, targets="qv", seq=3) == 4 * 184 + 6 * 14 + 144


def test_memory_slopes_fit_per_implementation() -> None:
    rows = [
        {
            "preset": "p",
            "impl": "jax",
            "backend": "vmap",
            "remat": False,
            "k": k,
            "peak_mib": 100.0 + 10.0 * k,
            "base_mib": 50.0,
        }
        for k in (1, 2, 4)
    ]
    rows.append({**rows[0], "impl": "torch", "backend": "loop"})  # one K only: no fit
    (fit,) = F.memory_slopes(rows)
    assert fit["impl"] == "ours (vmap)" and fit["ks"] == [1, 2, 4]
    assert fit["slope_mib"] == pytest.approx(10.0) and fit["intercept_mib"] == pytest.approx(100.0)


def test_random_leaves_are_deterministic_per_leaf() -> None:
    import bench_weights

    hf = F.PRESETS["tiny"].model.to_hf_dict()
    a = dict(bench_weights.random_leaves(hf, 0))
    b = dict(bench_weights.random_leaves(hf, 0))
    c = dict(bench_weights.random_leaves(hf, 1))
    key = ("layers", "attn", "q_proj")
    assert a[key].shape == (5, 64, 64)
    np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a[key], c[key])
    assert abs(float(a[key].std()) - bench_weights.STD) < 1e-3
    np.testing.assert_array_equal(a[("norm",)], np.ones(64, np.float32))


def test_bad_arguments_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        F.parse_args(["--clients", "0"])
    assert "--clients must be >= 1" in capsys.readouterr().err


def test_real_data_cell_packed_equals_dynamic_padding(tmp_path: pathlib.Path) -> None:
    """The real-data cell: ours on packed rows and the reference on the same examples padded per
    step compute the same round (same examples, same per-step loss), and count the same tokens."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    import real_data_round as R

    argv = ["--preset", "tiny", "--clients", "2", "--steps", "2", "--batch", "1", "--seq", "256",
            "--rows", "60", "--rounds", "1", "--in-process"]  # fmt: skip
    argv += ["--out", str(tmp_path / "real")]
    ours, ref = R.main(argv)
    assert ours["real_tokens"] == ref["real_tokens"] > 0
    assert ours["slots"] == 2 * 2 * 1 * 256 and ref["slots"] >= ref["real_tokens"]
    assert ours["real_tokens_per_s"] == pytest.approx(ours["real_tokens"] / ours["round_s"])
    assert ours["max_abs_diff_vs_ref"] < 1e-4
    assert "ours (packed, vmap)" in (tmp_path / "real.md").read_text()


def test_packed_and_padded_hold_the_same_examples(stories_dir: pathlib.Path) -> None:
    import real_data_round as R

    clients = R.dolly_clients(2, 256, 60, stories_dir)
    ours, ragged, real, slots = R.packed_and_padded(clients, 2, 1, 256, seed=0)
    flat = sorted(
        tuple(ours["tokens"][k, s, 0][ours["attn_mask"][k, s, 0] == j])
        for k in range(2) for s in range(2) for j in range(1, ours["attn_mask"][k, s, 0].max() + 1)
    )  # fmt: skip
    padded = sorted(
        tuple(t[m == 1])
        for name, t in ragged.items() if name.endswith("/tokens")
        for m in [ragged[name.replace("tokens", "attn_mask")]]
        for t, m in zip(t, m, strict=True)
    )  # fmt: skip
    assert flat == padded and real == sum(len(x) for x in flat) and slots >= real
