"""The shared second moment of K GaLore clients: AJIVE-style joint subspace and change of basis.

Client k holds a projector P_k (``galore.project`` conventions: right side r x n with orthonormal
rows, left side m x r with orthonormal columns) and Adam's second moment nu_k in that basis. The
server's shared moment lives in a basis B of the same form, so it is a GaLore state itself.

Change of basis. nu is a *diagonal* second moment: entry j is the variance along direction j.
Moving it to another basis uses the squared overlaps O = P_to P_from^T (right side), i.e. the
diagonal of the rotated covariance with cross terms dropped: ``nu_to = nu @ (O**2).T``. The
coverage ``c_j = sum(O[j]**2)`` says how much of new direction j the old basis spans; dividing by
it keeps magnitudes honest (a direction half outside must not inherit half a variance). Going
through the full m x n diagonal instead would spread a low-rank gradient's energy over all n
coordinates and shrink the moment by about n/r; the subspace route does not.

Joint basis (AJIVE, Feng et al. 2018, reduced to what a server can afford each round):
1. signal spaces: each client's signal row space is its GaLore subspace, the rows of P_k;
2. joint space: SVD of the stacked bases [sqrt(w_1) P_1^T, ..., sqrt(w_K) P_K^T] (w = normalised
   data weights). For its left singular vector b_a, sigma_a**2 = sum_k w_k cos^2(b_a, span P_k):
   the data-weighted mean squared cosine with the clients' subspaces (1 = in every client's space,
   w_k = in client k's only). ``ajive`` keeps, among the r leading directions, those with
   sigma_a**2 >= ``threshold``: a fixed threshold standing in for AJIVE's Wedin/random-direction
   bound. The default 0.75 ("within 30 degrees of every client's space on average") rejects a
   direction held by one client of two (0.5); a random direction scores about r/n.
   ``mean`` keeps all r leading directions (the principal subspace of the clients' average
   projection), client-specific ones included;
3. reconstruction: the shared moment along b_a is the coverage-weighted mean of the clients'
   moments moved into B: ``sum_k w_k (nu_k @ (O_k**2).T)[:, a] / sigma_a**2`` (O_k = B P_k^T).
A client then moves the shared moment into its new basis P'; directions of P' covered less than
``MIN_COVERAGE`` by the kept directions get 0 (no information: they start Adam cold).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from fedlora_jax.optim.galore import Side, thin_svd

Array = jax.Array
SyncMethod = Literal["ajive", "mean"]
MIN_COVERAGE = 0.5  # a new direction must lie at least half inside the shared basis to inherit
_TINY = 1e-6  # sigma**2 below this: a numerically empty direction (e.g. only zero-weight clients)


def _right(x: Array, side: Side) -> Array:
    """Left-side arrays transposed into the right-side convention (and back: an involution)."""
    return x if side == "right" else jnp.swapaxes(x, -1, -2)


def _normalised(weights: Array) -> Array:
    w = jnp.asarray(weights, jnp.float32)
    return w / jnp.maximum(jnp.sum(w), jnp.finfo(jnp.float32).tiny)


def change_basis(nu: Array, p_from: Array, p_to: Array, side: Side) -> tuple[Array, Array]:
    """(unnormalised moment in ``p_to``'s basis, coverage [r_to] of each new direction)."""
    nu, p_from, p_to = _right(nu, side), _right(p_from, side), _right(p_to, side)
    o2 = jnp.square(p_to @ p_from.T)  # [r_to, r_from]
    return _right(nu @ o2.T, side), jnp.sum(o2, axis=-1)


def to_basis(nu: Array, p_from: Array, p_to: Array, side: Side) -> Array:
    """Move a second moment into another basis: coverage-normalised, 0 where coverage is low."""
    moved, cover = change_basis(nu, p_from, p_to, side)
    ok = cover >= MIN_COVERAGE
    scale = jnp.where(ok, 1.0 / jnp.where(ok, cover, 1.0), 0.0)
    return _right(_right(moved, side) * scale, side)


def joint_basis(
    projs: Array, weights: Array, method: SyncMethod = "ajive", threshold: float = 0.75
) -> tuple[Array, Array]:
    """Right-side projectors [K, r, n] -> (basis [r, n], dropped rows zero; sigma**2 [r], 0 if
    dropped)."""
    if method not in ("ajive", "mean"):
        raise ValueError(f"fedgalore sync={method!r} is not known; allowed: ajive, mean, none")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"fedgalore threshold must be in (0, 1], got {threshold!r}")
    k, r, n = projs.shape
    w = _normalised(weights)
    stacked = (projs * jnp.sqrt(w)[:, None, None]).reshape(k * r, n).T  # [n, K r]
    u, sigma, _ = thin_svd(stacked)  # not jnp.linalg.svd: see galore.thin_svd (CPU deadlock)
    s2 = jnp.square(sigma[:r])
    keep = s2 >= (threshold if method == "ajive" else _TINY)
    return (u[:, :r] * keep).T, jnp.where(keep, s2, 0.0)


def shared_second_moment(
    nus: Array,
    projs: Array,
    weights: Array,
    side: Side,
    method: SyncMethod = "ajive",
    threshold: float = 0.75,
) -> tuple[Array, Array, Array]:
    """The server's shared moment from K clients' (nu_k, P_k) with a leading axis K.

    Returns (basis shaped like a projector, moment shaped like a client's nu, number of kept
    directions). Zero-weight clients contribute nothing.
    """
    nus_r, projs_r = _right(nus, side), _right(projs, side)
    basis, s2 = joint_basis(projs_r, weights, method, threshold)
    moved, _ = jax.vmap(change_basis, in_axes=(0, 0, None, None))(nus_r, projs_r, basis, "right")
    total = jnp.einsum("k,kmr->mr", _normalised(weights), moved)
    shared = jnp.where(s2 > 0, total / jnp.maximum(s2, _TINY), 0.0)
    kept = jnp.sum(s2 > 0).astype(jnp.int32)
    return _right(basis, side), _right(jnp.maximum(shared, 0.0), side), kept


def mean_second_moment(nus: Array, weights: Array) -> Array:
    """Data-weighted mean of moments already in one common basis (dense-Adam leaves), >= 0."""
    return jnp.maximum(jnp.einsum("k,k...->...", _normalised(weights), nus), 0.0)
