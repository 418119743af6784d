"""Server-side reductions over stacked client uploads (leading axis K), and aggregation
transforms composed like optax transforms.

An ``AggregationTransform`` maps the stacked client updates and their weights to new ones
(clipping each client's update, robust re-weighting, ...) with a state of its own; ``chain``
composes them; a ``Reducer`` (``weighted_mean`` by default; a noisy sum for DP) turns the result
into one update, with the server's key for any noise.

All functions are pure and jit-safe. A client with weight 0 (excluded this round, or holding no
data) contributes nothing, even if its upload row holds NaN: rows are masked before the sum, not
multiplied by zero (0 * NaN = NaN).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any
Array = jax.Array
Reducer = Callable[[PyTree, Array, Array | None], PyTree]  # (updates[K], weights[K], key)


class AggregationTransform(NamedTuple):
    """init(shared params) -> state; update(updates[K], weights[K], state, info) -> (updates[K],
    weights[K], state). ``info`` is the round's RoundInfo (round, server key, N)."""

    init: Callable[[PyTree], PyTree]
    update: Callable[[PyTree, Array, PyTree, Any], tuple[PyTree, Array, PyTree]]


def chain(*transforms: AggregationTransform) -> AggregationTransform:
    """Apply ``transforms`` in order; the state is the tuple of their states."""

    def init(params: PyTree) -> tuple:
        return tuple(t.init(params) for t in transforms)

    def update(updates: PyTree, weights: Array, state: tuple, info: Any) -> tuple:
        states = []
        for t, s in zip(transforms, state, strict=True):
            updates, weights, s = t.update(updates, weights, s, info)
            states.append(s)
        return updates, weights, tuple(states)

    return AggregationTransform(init, update)


def normalise_weights(weights: Array) -> Array:
    """``weights / sum(weights)`` in float32; all zeros stay zeros (no division by zero)."""
    w = jnp.asarray(weights, jnp.float32)
    total = jnp.sum(w)
    return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)


def _masked_rows(x: Array, w: Array) -> Array:
    """Zero the rows of ``x`` whose weight is 0, so NaN in an excluded row cannot leak."""
    keep = (w > 0).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x, jnp.zeros((), x.dtype))


def weighted_mean(uploads: PyTree, weights: Array, key: Array | None = None) -> PyTree:
    """Σ_k w_k · u_k / Σ_k w_k per leaf (FedAvg). All-zero weights give zeros: the engine then
    keeps the previous server state, so callers never see that value. ``key`` is unused (the
    Reducer signature)."""
    w = normalise_weights(weights)

    def reduce(u: Array) -> Array:
        acc = jnp.tensordot(w, _masked_rows(u, w).astype(jnp.float32), axes=1)
        return acc.astype(u.dtype)

    return jax.tree.map(reduce, uploads)


def fedavg(uploads: PyTree, weights: Array) -> PyTree:
    """FedAvg (McMahan et al. 2017): the data-size-weighted mean of the clients' uploads."""
    return weighted_mean(uploads, weights)
