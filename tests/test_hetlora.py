"""HetLoRA (issue 13): sparsity-weighted zero-padded aggregation against a hand-worked example and
numpy (a rank-2 and a rank-4 client, an excluded one), the tail norm and rank self-pruning by
hand, pruning through real engine rounds, and heterogeneous ranks as one compiled program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_engine import SIZES, N, make_batches, tiny_stories
from test_methods_lora_agg import R_MAX, aggregated, check_heterogeneous_round, modules, training

from fedlora_jax.algorithms import get
from fedlora_jax.algorithms.base import OptionsError
from fedlora_jax.algorithms.fedex_lora import map_modules
from fedlora_jax.algorithms.hetlora import (
    HetLoRAOptions,
    pruned_rank,
    sparsity_weighted_mean,
    tail_norm,
)
from fedlora_jax.federated import engine as E


@pytest.fixture(scope="module")
def model(stories_dir):
    return tiny_stories(stories_dir)


def one_module(A, B):
    return {"layer": {"q": {"A": jnp.asarray(A, jnp.float32), "B": jnp.asarray(B, jnp.float32)}}}


def test_sparsity_weights_by_hand():
    """‖B_1 A_1‖ = ‖diag(3, 0)‖ = 3 and ‖B_2 A_2‖ = ‖diag(0, 2)‖ = 2: p = (3/5, 2/5) whatever
    the data sizes; the excluded client's NaN rows stay out. All norms 0: data-size weights."""
    eye, nan = np.eye(2), np.full((2, 2), np.nan)
    uploads = one_module(np.stack([eye, 2 * eye, nan]),
                         np.stack([np.diag([3.0, 0.0]), np.diag([0.0, 1.0]), nan]))  # fmt: skip
    out = sparsity_weighted_mean("module")(uploads, jnp.array([5.0, 1.0, 0.0]))["layer"]["q"]
    np.testing.assert_allclose(out["B"], np.diag([1.8, 0.4]), rtol=1e-6)
    np.testing.assert_allclose(out["A"], 1.4 * eye, rtol=1e-6)
    zero_b = one_module(np.stack([eye, 2 * eye, nan]), np.stack([0 * eye, 0 * eye, nan]))
    out = sparsity_weighted_mean("module")(zero_b, jnp.array([5.0, 1.0, 0.0]))["layer"]["q"]
    np.testing.assert_allclose(out["A"], (5 * eye + 2 * eye) / 6, rtol=1e-6)


def test_client_scope_weights_by_hand():
    """Two modules: client 1's norms (3, 0), client 2's (1, 4): per client S = (3, √17)."""
    eye = np.eye(2)
    q = {"A": np.stack([eye, eye]), "B": np.stack([np.diag([3.0, 0.0]), np.diag([0.0, 1.0])])}
    v = {"A": np.stack([eye, eye]), "B": np.stack([0 * eye, np.diag([4.0, 0.0])])}
    uploads = jax.tree.map(jnp.asarray, {"layer": {"q": q, "v": v}})
    out = sparsity_weighted_mean("client")(uploads, jnp.array([1.0, 1.0]))["layer"]
    p = np.array([3.0, np.sqrt(17.0)]) / (3.0 + np.sqrt(17.0))
    np.testing.assert_allclose(out["v"]["B"], p[1] * np.diag([4.0, 0.0]), rtol=1e-6)
    np.testing.assert_allclose(out["q"]["B"], np.diag([3 * p[0], p[1]]), rtol=1e-6)


@pytest.mark.parametrize("scope", ["module", "client"])
def test_hetlora_aggregate_matches_numpy(model, scope):
    """Hand-made uploads (rank 2, rank 4, excluded NaN): zero-padded factors weighted by
    ‖B_k A_k‖_F (numpy, float64, the dense product), not by the data sizes (1, 3, 0)."""
    _, uploads, new = aggregated("hetlora", model[0], client_ranks="2,4,2,4", sparsity=scope)
    ups, got = modules(uploads), modules(new.params)
    prods = {
        path: [np.asarray(up["B"][k], np.float64) @ np.asarray(up["A"][k], np.float64)
               for k in (0, 1)]
        for path, up in ups.items()
    }  # fmt: skip
    s = {path: np.array([np.linalg.norm(d) for d in ds]) for path, ds in prods.items()}
    if scope == "client":
        total = np.sqrt(sum(np.square(v) for v in s.values()))
        s = dict.fromkeys(s, total)
    for path, leaf in got.items():
        p = s[path] / s[path].sum()
        assert abs(p[0] - 0.25) > 1e-3  # the data sizes would give (1/4, 3/4)
        for f in "AB":
            want = np.tensordot(p, np.asarray(ups[path][f][:2], np.float64), 1)
            np.testing.assert_allclose(leaf[f], want, rtol=1e-5, atol=1e-6, err_msg=path)


def test_tail_norm_and_pruning_by_hand():
    """A = I, B = diag(1, 2, 3, 4) at rank 4: γ = 0.5 gives the tail [2, 4) with norm 5 (√34 as
    received with B = diag(1, 2, 3, 5)), so the client prunes to 2; γ = 0.99 gives [3, 4)."""
    eye = np.eye(4)
    trained = one_module(eye, np.diag([1.0, 2, 3, 4]))
    received = one_module(eye, np.diag([1.0, 2, 3, 5]))
    r4 = jnp.int32(4)
    assert float(tail_norm(trained, r4, 0.5, 1)) == pytest.approx(5.0)
    assert float(tail_norm(received, r4, 0.5, 1)) == pytest.approx(np.sqrt(34.0))
    assert float(tail_norm(trained, r4, 0.99, 1)) == pytest.approx(4.0)
    cases = [  # (options, rank, expected rank)
        (HetLoRAOptions(decay=0.5), 4, 2),
        (HetLoRAOptions(decay=0.99), 4, 3),  # tail [3, 4): 4 < 5
        (HetLoRAOptions(decay=0.5, threshold=0.5), 4, 4),  # 5 >= 0.5 · √34
        (HetLoRAOptions(decay=0.5, threshold=0.0), 4, 4),  # τ = 0: never
        (HetLoRAOptions(decay=0.5, min_rank=3), 4, 3),  # tail [3, 4)
        (HetLoRAOptions(decay=0.5), 3, 3),  # tail [1, 3) at rank 3: (2, 3) vs (2, 3): equal
        (HetLoRAOptions(decay=0.5), 1, 1),  # t = max(1, 0) = 1: no tail at rank 1
    ]
    for options, rank, want in cases:
        got = int(pruned_rank(trained, received, jnp.int32(rank), options))
        assert got == want, (options, rank)
    assert int(pruned_rank(received, trained, r4, HetLoRAOptions(decay=0.5))) == 4  # tail grew


def test_tail_norm_matches_numpy_and_has_a_zero_gradient_at_zero():
    rng = np.random.default_rng(0)
    tree = {
        "q": {"A": rng.normal(size=(4, 6)), "B": rng.normal(size=(5, 4))},
        "v": {"A": rng.normal(size=(4, 6)), "B": rng.normal(size=(3, 4))},
    }
    tree = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
    # rank 3, γ = 0.7: t = ⌊2.1⌋ = 2, tail [2, 3); components >= 3 (padding) never count
    want = sum(
        np.linalg.norm(np.asarray(m["B"])[:, 2:3] @ np.asarray(m["A"])[2:3]) for m in tree.values()
    )
    assert float(tail_norm(tree, jnp.int32(3), 0.7, 1)) == pytest.approx(want, rel=1e-5)
    zero_b = {k: {**m, "B": jnp.zeros_like(m["B"])} for k, m in tree.items()}  # round 0: B = 0
    grads = jax.grad(lambda p: tail_norm(p, jnp.int32(4), 0.5, 1))(zero_b)
    for g in jax.tree.leaves(grads):
        assert np.all(np.asarray(g) == 0.0)


def test_clients_prune_through_engine_rounds(model):
    """Round 0 starts from B = 0 (tail norm 0: nothing to prune). Round 1 starts from a global
    model with a clear tail (B + 0.05), which a strong regulariser shrinks, so every client
    drops to rank 2: it reports receiving rank 4 and sending rank 2, keeps rank 2, and the
    global rows >= 2 are zero."""
    cfg, base = model
    alg = get("hetlora")(training(cfg), decay=0.5, reg=100.0)
    config = E.EngineConfig(seed=0)  # every client, every round
    batches = {k: v for k, v in make_batches().items() if k != "poison"}
    state = E.init_state(alg, base, N, seed=0)
    state, _ = E.run_round(alg, state, base, batches, SIZES, config)
    np.testing.assert_array_equal(state.client_states.rank, [R_MAX] * N)
    server = state.server_state
    tailed = map_modules(lambda m: {**m, "B": m["B"] + 0.05}, server.params)
    state = state._replace(server_state=server.replace(params=tailed))
    state, metrics = E.run_round(alg, state, base, batches, SIZES, config)
    np.testing.assert_array_equal(state.client_states.rank, [2] * N)
    assert metrics["train/down_rank/A"] == R_MAX and metrics["train/up_rank/B"] == 2
    per_rank = (64 + 64 + 64 + 32) * 2 * 4  # q 64 -> 64, v 64 -> 32, 2 layers, float32
    assert metrics["comm/up_bytes_per_client"] == pytest.approx(2 * per_rank)
    for leaf in modules(state.server_state.params).values():
        assert np.all(np.asarray(leaf["A"])[2:] == 0) and np.all(np.asarray(leaf["B"])[:, 2:] == 0)


def test_heterogeneous_round_is_one_program_with_zero_padding(model):
    """λ = 0 here: with λ = 0.01 one entry of 256 differed by 7e-5 between vmap and chunked
    (Adam's first steps turn a near-zero gradient's float noise into a ±lr step); the
    regulariser itself is checked by hand above and runs in the pruning rounds."""
    check_heterogeneous_round(model, "hetlora", reg=0.0)


def test_bad_options_are_one_line(model):
    for options, match in [
        ({"decay": 0.0}, r"decay=0.0 must lie in \(0, 1\]"),
        ({"sparsity": "layer"}, "sparsity='layer' is not allowed; allowed: module, client"),
        ({"min_rank": 5}, "min_rank=5 exceeds adapter.r=4"),
        ({"reg": -1.0}, "must be >= 0"),
    ]:
        with pytest.raises(OptionsError, match=match):
            get("hetlora")(training(model[0]), **options)
