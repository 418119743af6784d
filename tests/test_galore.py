"""GaLore-Adam transform (fedlora_jax.optim.galore), checked against optax.adam and numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedlora_jax.optim import galore

LR = 0.01


def _grads(step: int) -> dict:
    """A deterministic gradient sequence: a tall, a wide and a 1-D leaf."""
    rng = np.random.default_rng(step)
    return {
        "tall": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
        "wide": jnp.asarray(rng.normal(size=(5, 9)), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
    }


def _params() -> dict:
    return jax.tree.map(jnp.zeros_like, _grads(0))


def _run(tx: optax.GradientTransformation, state, steps: int, offset: int = 1):
    params, outs = _params(), []
    for t in range(steps):
        upd, state = tx.update(_grads(t + offset), state, params)
        params = optax.apply_updates(params, upd)
        outs.append(params)
    return outs, state


def test_full_rank_identity_projector_equals_adam():
    tx = galore.galore_adamw(LR, rank=3, update_proj_gap=1000, scale=1.0, dense_fallback=False)
    params = {"a": jnp.zeros((5, 3)), "b": jnp.zeros((3, 8)), "c": jnp.zeros((4,))}
    state = tx.init(params)
    eye = {"a": jnp.eye(3), "b": jnp.eye(3), "c": None}
    state = galore.set_projectors(state, eye)
    ref = optax.adam(LR)
    rstate = ref.init(params)
    p, q = params, params
    rng = np.random.default_rng(0)
    for _ in range(6):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        u, state = tx.update(g, state, p)
        v, rstate = ref.update(g, rstate, q)
        p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
    for k in params:
        np.testing.assert_allclose(p[k], q[k], rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(p["a"]).max()) > 0.02  # several real steps were taken


def test_dense_fallback_leaves_are_plain_adam():
    tx = galore.galore_adamw(LR, rank=4, update_proj_gap=2)  # tall 6x4: min side 4 <= rank
    state = tx.init(_params())
    assert galore.projectors(state)["tall"] is None and galore.projectors(state)["bias"] is None
    assert galore.projectors(state)["wide"].shape == (5, 4)  # 5x9 is "left": P is m x r
    outs, _ = _run(tx, state, 4)
    ref_outs, _ = _run(optax.adam(LR), optax.adam(LR).init(_params()), 4)
    for k in ("tall", "bias"):
        np.testing.assert_allclose(outs[-1][k], ref_outs[-1][k], rtol=1e-5, atol=1e-7)
    assert not np.allclose(outs[-1]["wide"], ref_outs[-1]["wide"], atol=1e-4)


def test_projectors_orthonormal_and_span_top_singular_space():
    g = _grads(3)
    tx = galore.scale_by_galore(rank=2, update_proj_gap=5)
    _, state = tx.update(g, tx.init(g))
    proj = galore.projectors(state)
    tall, wide = np.asarray(proj["tall"]), np.asarray(proj["wide"])
    assert tall.shape == (2, 4) and wide.shape == (5, 2)  # 6x4 -> right (r x n); 5x9 -> left
    np.testing.assert_allclose(tall @ tall.T, np.eye(2), atol=1e-5)
    np.testing.assert_allclose(wide.T @ wide, np.eye(2), atol=1e-5)
    u, _, vh = np.linalg.svd(np.asarray(g["tall"]))
    np.testing.assert_allclose(tall.T @ tall, vh[:2].T @ vh[:2], atol=1e-5)
    u, _, vh = np.linalg.svd(np.asarray(g["wide"]))
    np.testing.assert_allclose(wide @ wide.T, u[:, :2] @ u[:, :2].T, atol=1e-5)


def test_first_step_matches_numpy():
    """Step 1: mu_hat = g_low, nu_hat = g_low**2, so the update is -lr*scale*sign(g_low) @ P."""
    g = _grads(7)
    tx = galore.galore_adamw(LR, rank=2, update_proj_gap=5, scale=0.5, eps=1e-12)
    upd, _ = tx.update(g, tx.init(g))
    gt = np.asarray(g["tall"], np.float64)
    _, _, vh = np.linalg.svd(gt)
    p = vh[:2]
    want = -LR * 0.5 * np.sign(gt @ p.T) @ p
    np.testing.assert_allclose(upd["tall"], want, rtol=1e-4, atol=1e-6)


def test_refresh_period_respected():
    period, steps = 3, 8
    tx = galore.scale_by_galore(rank=2, update_proj_gap=period)
    state = tx.init(_params())
    prev = None
    changed = []
    for t in range(steps):
        _, state = tx.update(_grads(100 + t), state)
        cur = galore.projectors(state)
        if prev is not None:
            changed.append(
                [not np.allclose(cur[k], prev[k]) for k in ("tall", "wide") if cur[k] is not None]
            )
        prev = cur
    expect = [t % period == 0 for t in range(1, steps)]
    assert [all(c) for c in changed] == expect
    assert [any(c) for c in changed] == expect


def test_refresh_projectors_is_not_repeated_by_update():
    g = _grads(11)
    tx = galore.scale_by_galore(rank=2, update_proj_gap=4)
    state = galore.refresh_projectors(tx.init(g), g)
    fixed = galore.projectors(state)
    # The update at step 0 sees a different gradient but must keep the projectors just computed.
    _, state = tx.update(_grads(12), state)
    for k in ("tall", "wide"):
        np.testing.assert_array_equal(galore.projectors(state)[k], fixed[k])


def test_warm_second_moment_skips_its_bias_correction():
    g = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)}
    tx = galore.scale_by_galore(rank=3, update_proj_gap=10, scale=1.0, dense_fallback=False)
    state = galore.set_projectors(tx.init(g), {"w": jnp.eye(3)})
    seed = np.full((4, 3), 2.0, np.float32)
    seed[1, 2] = 0.0  # a zero seed carries no information: that entry keeps the usual correction
    state = galore.set_second_moment(state, {"w": jnp.asarray(seed)})
    upd, state = tx.update(g, state)
    b2, gw = 0.999, np.asarray(g["w"])
    nu = b2 * seed + (1 - b2) * gw**2
    np.testing.assert_allclose(galore.second_moment(state)["w"], nu, rtol=1e-6)
    nu_hat = nu.copy()
    nu_hat[1, 2] = gw[1, 2] ** 2  # (1 - b2) g^2 / (1 - b2)
    np.testing.assert_allclose(upd["w"], gw / (np.sqrt(nu_hat) + 1e-8), rtol=1e-5)
    cold = galore.set_second_moment(state, {"w": jnp.asarray(seed)}, warm=False)
    assert not np.any(galore.find_state(cold).nu_warm["w"])
    with pytest.raises(ValueError, match="shape"):
        galore.set_second_moment(state, {"w": jnp.zeros((3, 4))})


def test_vmap_and_jit_match_per_client_runs():
    tx = galore.galore_adamw(LR, rank=2, update_proj_gap=2)
    k, steps = 3, 4
    grads = [[_grads(1000 * c + t) for t in range(steps)] for c in range(k)]

    def client(gs):
        def body(carry, g):
            p, s = carry
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, s), _ = jax.lax.scan(body, (_params(), tx.init(_params())), gs)
        return p, galore.projectors(s)

    def stack(trees):
        return jax.tree.map(lambda *y: jnp.stack(y), *trees)

    stacked = stack([stack(gc) for gc in grads])
    batched, bproj = jax.jit(jax.vmap(client))(stacked)
    for c in range(k):
        p, proj = client(stack(grads[c]))
        for key in p:
            np.testing.assert_allclose(batched[key][c], p[key], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.abs(bproj["tall"][c]), np.abs(proj["tall"]), atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": 2, "update_proj_gap": 0}, "update_proj_gap"),
        ({"rank": 2, "scale": 0.0}, "scale"),
    ],
)
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        galore.scale_by_galore(**kwargs)
