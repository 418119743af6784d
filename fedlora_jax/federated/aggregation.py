"""Server-side reductions over stacked client uploads (leading axis K).

All functions are pure and jit-safe. A client with weight 0 (excluded this round, or holding no
data) contributes nothing, even if its upload row holds NaN: rows are masked before the sum, not
multiplied by zero (0 * NaN = NaN).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
Array = jax.Array


def normalise_weights(weights: Array) -> Array:
    """``weights / sum(weights)`` in float32; all zeros stay zeros (no division by zero)."""
    w = jnp.asarray(weights, jnp.float32)
    total = jnp.sum(w)
    return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)


def _masked_rows(x: Array, w: Array) -> Array:
    """Zero the rows of ``x`` whose weight is 0, so NaN in an excluded row cannot leak."""
    keep = (w > 0).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x, jnp.zeros((), x.dtype))


def weighted_mean(uploads: PyTree, weights: Array) -> PyTree:
    """Σ_k w_k · u_k / Σ_k w_k per leaf (FedAvg). All-zero weights give zeros: the engine then
    keeps the previous server state, so callers never see that value."""
    w = normalise_weights(weights)

    def reduce(u: Array) -> Array:
        acc = jnp.tensordot(w, _masked_rows(u, w).astype(jnp.float32), axes=1)
        return acc.astype(u.dtype)

    return jax.tree.map(reduce, uploads)


def fedavg(uploads: PyTree, weights: Array) -> PyTree:
    """FedAvg (McMahan et al. 2017): the data-size-weighted mean of the clients' uploads."""
    return weighted_mean(uploads, weights)


def mean(uploads: PyTree, weights: Array | None = None) -> PyTree:
    """Unweighted mean over the participating clients (weight > 0); all clients when None."""
    if weights is None:
        return jax.tree.map(lambda u: jnp.mean(u.astype(jnp.float32), 0).astype(u.dtype), uploads)
    return weighted_mean(uploads, (jnp.asarray(weights) > 0).astype(jnp.float32))
