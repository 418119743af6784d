"""Second-moment change of basis and the AJIVE-style joint signal (fedlora_jax.optim.ajive)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax.optim import ajive


def _orthonormal(rng: np.random.Generator, n: int, r: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(n, r)))
    return q


def test_lift_and_to_basis_are_rotated_covariance_diagonals():
    rng = np.random.default_rng(0)
    m, n, r = 4, 7, 3
    p = _orthonormal(rng, n, r).T  # right side: r x n
    nu = rng.uniform(size=(m, r))
    full = np.asarray(ajive.lift(jnp.asarray(nu), jnp.asarray(p), "right"))
    # Row i: diag(P^T diag(nu_i) P), the full-space variance of a projected-back gradient.
    want = np.stack([np.diag(p.T @ np.diag(nu[i]) @ p) for i in range(m)])
    np.testing.assert_allclose(full, want, rtol=1e-5)
    p_new = _orthonormal(rng, n, r).T
    back = np.asarray(ajive.to_basis(jnp.asarray(want), jnp.asarray(p_new), "right"))
    want_back = np.stack([np.diag(p_new @ np.diag(want[i]) @ p_new.T) for i in range(m)])
    np.testing.assert_allclose(back, want_back, rtol=1e-5)
    # Left side is the transposed picture.
    left = np.asarray(ajive.lift(jnp.asarray(nu.T), jnp.asarray(p.T), "left"))
    np.testing.assert_allclose(left, want.T, rtol=1e-5)


def test_identity_and_selection_projectors_are_exact():
    rng = np.random.default_rng(1)
    v = jnp.asarray(rng.uniform(size=(5, 6)), jnp.float32)
    select = jnp.asarray(np.eye(6)[[4, 1, 2]])  # right: 3 x 6 coordinate selection
    low = ajive.to_basis(v, select, "right")
    np.testing.assert_allclose(low, np.asarray(v)[:, [4, 1, 2]])
    np.testing.assert_allclose(
        ajive.to_basis(ajive.lift(low, select, "right"), select, "right"), low
    )


def _planted(rng: np.random.Generator, k: int, m: int, n: int, noise: float):
    """Blocks X_k = J + I_k + E_k: J shared (row space R_J, rank 2), I_k client-specific rank 2
    with row spaces orthogonal to R_J (AJIVE's model), E_k small noise."""
    basis = _orthonormal(rng, n, 2 + 2 * k)
    rj = basis[:, :2]
    joint = rng.normal(size=(m, 2)) @ rj.T * 3.0
    blocks = []
    for c in range(k):
        ri = basis[:, 2 + 2 * c : 4 + 2 * c]
        indiv = rng.normal(size=(m, 2)) @ ri.T * 3.0
        blocks.append(joint + indiv + noise * rng.normal(size=(m, n)))
    return np.stack(blocks), joint, rj


def test_joint_component_recovers_planted_shared_signal():
    rng = np.random.default_rng(2)
    blocks, joint, rj = _planted(rng, k=4, m=10, n=24, noise=0.01)
    w = np.array([1.0, 2.0, 1.0, 3.0])
    est, jrank = ajive.joint_component(jnp.asarray(blocks), jnp.asarray(w), signal_rank=4)
    est = np.asarray(est)
    assert int(jrank) == 2
    assert np.linalg.norm(est - joint) < 0.02 * np.linalg.norm(joint)
    # Nothing outside the planted joint row space survives (client-specific parts discarded).
    outside = est - est @ rj @ rj.T
    assert np.linalg.norm(outside) < 0.01 * np.linalg.norm(joint)
    # The plain weighted mean keeps the client-specific parts: the extraction is doing work.
    mean = np.einsum("k,kmn->mn", w / w.sum(), blocks)
    assert np.linalg.norm(mean - joint) > 0.3 * np.linalg.norm(joint)


def test_zero_weight_client_is_ignored():
    rng = np.random.default_rng(3)
    blocks, _, _ = _planted(rng, k=3, m=8, n=20, noise=0.01)
    w = jnp.asarray([1.0, 1.0, 0.0])
    junk = blocks.copy()
    junk[2] = 50.0 * rng.normal(size=junk[2].shape)
    a, ra = ajive.joint_component(jnp.asarray(blocks), w, signal_rank=4)
    b, rb = ajive.joint_component(jnp.asarray(junk), w, signal_rank=4)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert int(ra) == int(rb) == 2


@pytest.mark.parametrize("side", ["right", "left"])
def test_shared_second_moment_sides_and_mean(side):
    rng = np.random.default_rng(4)
    blocks, joint, _ = _planted(rng, k=3, m=10, n=24, noise=0.01)
    # Identity projectors make the lift the identity, so the planted blocks are the nus.
    if side == "right":
        nus, projs = blocks, np.broadcast_to(np.eye(24), (3, 24, 24))
    else:
        nus, projs = blocks.transpose(0, 2, 1), np.broadcast_to(np.eye(24), (3, 24, 24))
    w = jnp.ones(3)
    shared, jrank = ajive.shared_second_moment(
        jnp.asarray(nus), jnp.asarray(projs), w, side, signal_rank=4
    )
    got = np.asarray(shared) if side == "right" else np.asarray(shared).T
    assert int(jrank) == 2
    np.testing.assert_allclose(got, np.maximum(joint, 0.0), atol=0.05 * np.abs(joint).max())
    mean, _ = ajive.shared_second_moment(jnp.asarray(nus), jnp.asarray(projs), w, side, "mean")
    np.testing.assert_allclose(mean, np.maximum(np.asarray(nus).mean(0), 0.0), rtol=1e-5)
    assert float(jnp.min(shared)) >= 0.0


def test_bad_sync_and_threshold_are_named():
    nus, projs = jnp.ones((2, 3, 2)), jnp.ones((2, 2, 4))
    with pytest.raises(ValueError, match="sync="):
        ajive.shared_second_moment(nus, projs, jnp.ones(2), "right", "median")
    with pytest.raises(ValueError, match="threshold"):
        ajive.shared_second_moment(nus, projs, jnp.ones(2), "right", threshold=1.5)
