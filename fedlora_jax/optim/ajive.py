"""The shared second moment of K GaLore clients: change of basis and AJIVE-style joint signal.

Each client's Adam second moment ``nu_k`` lives in its own projected basis P_k (see
``galore.project``). It is a *diagonal* second moment, so a change of basis maps it through the
squared projector entries, the diagonal of the rotated covariance (cross terms dropped):

* lift to the full m x n space: right side ``nu @ P**2``; left side ``P**2 @ nu``;
* into a (new) basis P': right side ``V @ (P'**2).T``; left side ``(P'**2).T @ V``.

Both maps keep ``nu >= 0`` and are exact for identity / coordinate-selection projectors.

``joint_component`` is AJIVE (Feng et al. 2018) reduced to what a server can afford each round:
1. signal extraction: for each block X_k (m x n) keep the top ``signal_rank`` right singular
   vectors with a non-negligible singular value; they span the block's signal row space;
2. joint space: stack the bases, each scaled by sqrt(w_k) (w = normalised data weights), and take
   the SVD. For a left singular vector u_i of the stack, sigma_i**2 = sum_k w_k cos^2(u_i, block
   k's space): the data-weighted mean squared cosine with the clients' signal spaces (1 = in every
   client's space, w_k = in client k's only). Directions with sigma_i**2 >= ``threshold`` are joint.
   This fixed threshold stands in for AJIVE's Wedin / random-direction bound; the default 0.75
   means "on average within 30 degrees of every client's space", which rejects a direction held by
   one client of two (0.5). A random direction scores about signal_rank / n, so keep
   signal_rank well under n/2;
3. reconstruction: the joint part of block k is X_k Pi (Pi = projector onto the joint space);
   their data-weighted mean, clipped at 0, is the shared second moment.
The joint space is taken on the projector's side (rows of the lifted block for "right", columns
for "left"), the side on which the clients' subspaces differ.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from fedlora_jax.optim.galore import Side

Array = jax.Array
SyncMethod = Literal["ajive", "mean"]
_REL_TOL = 1e-5  # singular values below this fraction of a block's largest are numerical zeros


def lift(nu: Array, proj: Array, side: Side) -> Array:
    """Projected diagonal second moment -> full m x n space."""
    p2 = jnp.square(proj)
    return nu @ p2 if side == "right" else p2 @ nu


def to_basis(full: Array, proj: Array, side: Side) -> Array:
    """Full m x n diagonal second moment -> the basis of ``proj`` (right: m x r, left: r x n)."""
    p2 = jnp.square(proj)
    return full @ p2.T if side == "right" else p2.T @ full


def _normalised(weights: Array) -> Array:
    w = jnp.asarray(weights, jnp.float32)
    return w / jnp.maximum(jnp.sum(w), jnp.finfo(jnp.float32).tiny)


def mean_second_moment(blocks: Array, weights: Array) -> Array:
    """Data-weighted mean of full-space blocks [K, m, n], clipped at 0."""
    return jnp.maximum(jnp.einsum("k,kmn->mn", _normalised(weights), blocks), 0.0)


def joint_component(
    blocks: Array, weights: Array, signal_rank: int, threshold: float = 0.75
) -> tuple[Array, Array]:
    """Data-weighted mean of the blocks' joint parts on the row space (last axis).

    blocks [K, m, n], weights [K] (0 = client left out). Returns (joint mean [m, n], joint rank).
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"fedgalore threshold must be in (0, 1], got {threshold!r}")
    k, _, n = blocks.shape
    w = _normalised(weights)
    _, s, vh = jnp.linalg.svd(blocks.astype(jnp.float32), full_matrices=False)
    r = min(signal_rank, s.shape[-1])
    signal = s[:, :r] > _REL_TOL * s[:, :1]
    bases = vh[:, :r, :] * (jnp.sqrt(w)[:, None] * signal)[..., None]  # [K, r, n]
    u, sigma, _ = jnp.linalg.svd(bases.reshape(k * r, n).T, full_matrices=False)
    joint = (jnp.square(sigma) >= threshold).astype(jnp.float32)
    pi = (u * joint) @ u.T
    mean = jnp.einsum("k,kmn->mn", w, blocks.astype(jnp.float32)) @ pi
    return mean, jnp.sum(joint).astype(jnp.int32)


def shared_second_moment(
    nus: Array,
    projs: Array,
    weights: Array,
    side: Side,
    method: SyncMethod = "ajive",
    signal_rank: int | None = None,
    threshold: float = 0.75,
) -> tuple[Array, Array]:
    """The server's shared second moment (full m x n, >= 0) from K clients' projected ones.

    nus [K, ...projected], projs [K, ...projector] in each client's own basis. ``signal_rank``
    defaults to the projector rank. Returns (shared, joint rank; for "mean" the lifted rank bound).
    """
    blocks = jax.vmap(lift, in_axes=(0, 0, None))(nus, projs, side)
    rank = projs.shape[-2] if side == "right" else projs.shape[-1]
    if method == "mean":
        return mean_second_moment(blocks, weights), jnp.asarray(rank, jnp.int32)
    if method != "ajive":
        raise ValueError(f"fedgalore sync={method!r} is not known; allowed: ajive, mean, none")
    if side == "left":
        blocks = jnp.swapaxes(blocks, -1, -2)
    shared, joint_rank = joint_component(blocks, weights, signal_rank or rank, threshold)
    if side == "left":
        shared = shared.T
    return jnp.maximum(shared, 0.0), joint_rank
