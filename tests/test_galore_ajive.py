"""Second-moment change of basis, the projector-subspace method and AJIVE with its Wedin and
random-direction bounds (fedlora_jax.optim.ajive), against numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax.optim import ajive

M, N, R, K = 10, 24, 4, 4


def _orthonormal_rows(rng: np.random.Generator, r: int, n: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(n, r)))
    return q.T


def test_change_basis_is_rotated_covariance_diagonal():
    rng = np.random.default_rng(0)
    p_from, p_to = _orthonormal_rows(rng, 3, 7), _orthonormal_rows(rng, 3, 7)
    nu = rng.uniform(size=(5, 3))
    got, cover = ajive.change_basis(
        jnp.asarray(nu), jnp.asarray(p_from), jnp.asarray(p_to), "right"
    )
    # Row i: diag(P_to C_i P_to^T) with C_i = P_from^T diag(nu_i) P_from (full-space covariance).
    want = np.stack([np.diag(p_to @ p_from.T @ np.diag(v) @ p_from @ p_to.T) for v in nu])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(cover, np.sum((p_to @ p_from.T) ** 2, axis=1), rtol=1e-5)
    # The left side is the transposed picture (projectors m x r, moments r x n).
    left, _ = ajive.change_basis(
        jnp.asarray(nu.T), jnp.asarray(p_from.T), jnp.asarray(p_to.T), "left"
    )
    np.testing.assert_allclose(left, want.T, rtol=1e-5)


def test_to_basis_keeps_energy_in_the_same_span_and_drops_uncovered_directions():
    rng = np.random.default_rng(1)
    basis = _orthonormal_rows(rng, 4, 12)
    rot = np.linalg.qr(rng.normal(size=(2, 2)))[0]
    outside = _orthonormal_rows(rng, 2, 12)
    outside -= outside @ basis.T @ basis  # orthogonal to the basis
    outside = np.linalg.qr(outside.T)[0].T
    # New basis: a rotation of the first two basis rows, then two directions outside its span.
    new = np.concatenate([rot @ basis[:2], outside])
    nu = rng.uniform(1.0, 2.0, size=(5, 4))
    nu[:, 2:] = 0.0  # energy only along the first two basis directions
    got = np.asarray(ajive.to_basis(jnp.asarray(nu), jnp.asarray(basis), jnp.asarray(new), "right"))
    np.testing.assert_allclose(got[:, :2].sum(1), nu[:, :2].sum(1), rtol=1e-5)
    np.testing.assert_allclose(got[:, 2:], 0.0, atol=1e-6)
    # Exact for the same basis.
    same = ajive.to_basis(jnp.asarray(nu), jnp.asarray(basis), jnp.asarray(basis), "right")
    np.testing.assert_allclose(same, nu, rtol=1e-5, atol=1e-6)


def _planted(rng: np.random.Generator):
    """K clients whose GaLore subspaces share 2 joint directions J (in client-specific order and
    sign) plus 2 directions of their own, orthogonal to J. The joint moment is the same for all
    clients (up to that order), the individual moments are large and client-specific."""
    basis = _orthonormal_rows(rng, 2 + 2 * K, N)
    joint = basis[:2]
    joint_nu = rng.uniform(1.0, 2.0, size=(M, 2))
    projs, nus = [], []
    for k in range(K):
        order = [1, 0] if k % 2 else [0, 1]
        sign = np.array([1.0, -1.0])[:, None] if k % 3 == 0 else 1.0
        projs.append(np.concatenate([sign * joint[order], basis[2 + 2 * k : 4 + 2 * k]]))
        nus.append(np.concatenate([joint_nu[:, order], rng.uniform(10, 20, (M, 2))], axis=1))
    return np.stack(projs), np.stack(nus), joint, joint_nu


def test_joint_subspace_recovered_and_individual_parts_discarded():
    rng = np.random.default_rng(2)
    projs, nus, joint, joint_nu = _planted(rng)
    w = np.array([1.0, 2.0, 1.0, 3.0])
    basis, shared, kept = ajive.shared_second_moment(
        jnp.asarray(nus), jnp.asarray(projs), jnp.asarray(w), "right", "subspace"
    )
    basis, shared = np.asarray(basis), np.asarray(shared)
    assert int(kept) == 2
    # The kept rows span exactly the planted joint space; the dropped rows are zero.
    np.testing.assert_allclose(basis.T @ basis, joint.T @ joint, atol=1e-5)
    # Step 3 in numpy: coverage-weighted mean of the clients' moments moved into the basis.
    wn = w / w.sum()
    moved = sum(wk * v @ ((basis @ p.T) ** 2).T for wk, v, p in zip(wn, nus, projs, strict=True))
    cover = sum(wk * np.sum((basis @ p.T) ** 2, axis=1) for wk, p in zip(wn, projs, strict=True))
    want = np.where(cover > 1e-6, moved / np.maximum(cover, 1e-6), 0.0)
    np.testing.assert_allclose(shared, want, rtol=1e-4, atol=1e-6)
    # A client whose new subspace is J plus client 0's individual directions: it inherits the
    # joint energy along J and nothing (a cold start) on the individual directions.
    new = np.concatenate([joint, projs[0, 2:]])
    seed = np.asarray(
        ajive.to_basis(jnp.asarray(shared), jnp.asarray(basis), jnp.asarray(new), "right")
    )
    np.testing.assert_allclose(seed[:, :2].sum(1), joint_nu.sum(1), rtol=1e-4)
    np.testing.assert_allclose(seed[:, 2:], 0.0, atol=1e-6)
    # "mean" keeps the r leading directions of the union, here J and the individual directions
    # of the heaviest client (3): its client-specific moments leak into the shared state.
    b_mean, s_mean, kept_mean = ajive.shared_second_moment(
        jnp.asarray(nus), jnp.asarray(projs), jnp.asarray(w), "right", "mean"
    )
    assert int(kept_mean) == R
    heavy = jnp.asarray(np.concatenate([joint, projs[3, 2:]]))
    leaked = ajive.to_basis(s_mean, b_mean, heavy, "right")[:, 2:]
    np.testing.assert_allclose(np.asarray(leaked).sum(1), nus[3, :, 2:].sum(1), rtol=1e-4)
    np.testing.assert_allclose(ajive.to_basis(shared, basis, heavy, "right")[:, 2:], 0.0)


def test_left_side_is_the_transpose_and_zero_weight_is_ignored():
    rng = np.random.default_rng(3)
    projs, nus, _, _ = _planted(rng)
    w = jnp.asarray([1.0, 1.0, 1.0, 0.0])
    b, s, kept = ajive.shared_second_moment(
        jnp.asarray(nus), jnp.asarray(projs), w, "right", "subspace"
    )
    junk_nus, junk_projs = nus.copy(), projs.copy()
    junk_nus[3] = 1e6
    junk_projs[3] = _orthonormal_rows(rng, R, N)
    bl, sl, kl = ajive.shared_second_moment(
        jnp.asarray(junk_nus.transpose(0, 2, 1)),
        jnp.asarray(junk_projs.transpose(0, 2, 1)),
        w,
        "left",
        "subspace",
    )
    assert int(kept) == int(kl) == 2
    right_form = np.asarray(bl).T  # left-side bases are m x r: the transposed picture
    np.testing.assert_allclose(right_form.T @ right_form, np.asarray(b.T @ b), atol=1e-5)
    # Per row of the moment, the joint energy does not depend on the basis chosen inside the span.
    np.testing.assert_allclose(np.asarray(sl).sum(0), np.asarray(s).sum(1), rtol=1e-4)


def test_bad_sync_and_threshold_are_named():
    nus, projs = jnp.ones((2, 3, 2)), jnp.ones((2, 2, 4))
    with pytest.raises(ValueError, match="sync="):
        ajive.shared_second_moment(nus, projs, jnp.ones(2), "right", "median")
    with pytest.raises(ValueError, match="threshold"):
        ajive.shared_second_moment(nus, projs, jnp.ones(2), "right", "subspace", threshold=1.5)
    with pytest.raises(ValueError, match="AjiveSettings and a PRNG key"):
        ajive.shared_second_moment(nus, projs, jnp.ones(2), "right", "ajive")


# ------------------------------------------------------------------ AJIVE's rank selection


def _np_frame(basis: np.ndarray, draw: np.ndarray) -> np.ndarray:
    """py_jive's sample: project a Gaussian draw off the basis, then QR."""
    return np.linalg.qr(draw - basis @ (basis.T @ draw))[0]


def test_bounds_match_numpy_on_a_small_case():
    rng = np.random.default_rng(5)
    m, r, s, k, n = 8, 4, 2, 2, 6
    block = rng.normal(size=(m, r))
    u_draws, v_draws = rng.normal(size=(n, m, s)), rng.normal(size=(n, r, s))
    u, d, vh = np.linalg.svd(block, full_matrices=False)
    want = [
        min(
            max(
                np.linalg.norm(block.T @ _np_frame(u[:, :s], du), ord=2),
                np.linalg.norm(block @ _np_frame(vh[:s].T, dv), ord=2),
            )
            / d[s - 1],
            1.0,
        )
        for du, dv in zip(u_draws, v_draws, strict=True)
    ]
    got = ajive.wedin_samples(jnp.asarray(block), s, jnp.asarray(u_draws), jnp.asarray(v_draws))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)
    assert min(want) > 0.0 and max(want) <= 1.0
    draws = rng.normal(size=(n, k + 1, m, s))
    want_rand = [
        np.linalg.svd(np.concatenate([np.linalg.qr(z)[0] for z in zs[:k]], axis=1))[1][0] ** 2
        for zs in draws
    ]  # the third block is invalid: left out
    got_rand = ajive.random_direction_samples(jnp.asarray(draws), jnp.asarray([True, True, False]))
    np.testing.assert_allclose(np.asarray(got_rand), want_rand, rtol=1e-4)
    assert all(1.0 < v < k for v in want_rand)  # two random 2-frames in R^8 overlap partly


def _planted_blocks(rng, joint_rank: int, k: int = 3, m: int = 40, r: int = 8, noise=0.05):
    """k blocks m x r sharing a rank-``joint_rank`` column space J, each with an individual
    rank-(4 - joint_rank) part, plus Gaussian noise; all signal singular values in [1, 3]."""
    basis = np.linalg.qr(rng.normal(size=(m, joint_rank + k * (4 - joint_rank))))[0]
    joint, blocks = basis[:, :joint_rank], []
    for i in range(k):
        lo = joint_rank + i * (4 - joint_rank)
        cols = np.concatenate([joint, basis[:, lo : lo + 4 - joint_rank]], axis=1)
        loads = np.linalg.qr(rng.normal(size=(r, 4)))[0] * rng.uniform(1.0, 3.0, 4)
        blocks.append(cols @ loads.T + noise * rng.normal(size=(m, r)) / np.sqrt(m))
    return np.stack(blocks), joint


@pytest.mark.parametrize("planted", [0, 1, 2, 3])
def test_ajive_recovers_the_planted_joint_rank(planted):
    rng = np.random.default_rng(10 + planted)
    blocks, joint = _planted_blocks(rng, planted)
    settings = ajive.AjiveSettings(signal_rank=4, samples=300)
    basis, rank, bounds = ajive.joint_space(
        jnp.asarray(blocks), jnp.ones(3, bool), settings, jax.random.key(0)
    )
    assert int(rank) == planted
    basis = np.asarray(basis)
    # The kept columns span J (projectors agree); the dropped columns are zero.
    np.testing.assert_allclose(basis @ basis.T, joint @ joint.T, atol=1e-2)
    sv2 = np.asarray(bounds["sv2"])
    cutoff = float(bounds["cutoff"])
    assert cutoff == max(float(bounds["wedin"]), float(bounds["random"]))
    assert np.all(sv2[:planted] > cutoff) and np.all(sv2[planted:] <= cutoff)


def test_ajive_ignores_excluded_blocks_and_projects_the_moment():
    rng = np.random.default_rng(20)
    blocks, joint = _planted_blocks(rng, 2, k=4)
    blocks[3] = rng.normal(size=blocks[3].shape) * 1e3  # an excluded client's junk
    settings = ajive.AjiveSettings(signal_rank=4, samples=300)
    valid = jnp.asarray([True, True, True, False])
    _, rank, _ = ajive.joint_space(jnp.asarray(blocks), valid, settings, jax.random.key(1))
    assert int(rank) == 2
    # Through shared_second_moment: identical projectors, so the basis change is the identity
    # and the shared moment is J J^T (weighted mean of the valid blocks), clipped at 0.
    projs = np.broadcast_to(np.eye(8)[None], (4, 8, 8)).copy()
    w = jnp.asarray([1.0, 2.0, 1.0, 0.0])
    _, shared, kept = ajive.shared_second_moment(
        jnp.asarray(blocks), jnp.asarray(projs), w, "right", "ajive", 0.75, settings,
        jax.random.key(1),
    )  # fmt: skip
    mean = (blocks[0] + 2 * blocks[1] + blocks[2]) / 4
    want = np.maximum(joint @ (joint.T @ mean), 0.0)
    assert int(kept) == 2
    np.testing.assert_allclose(np.asarray(shared), want, atol=2e-2 * np.abs(want).max())
