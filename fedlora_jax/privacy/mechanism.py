"""The DP-FedAvg mechanism on the aggregation contract (``federated.aggregation``).

``clip_updates`` is an ``AggregationTransform``: it clips each client's update of its shared
leaves to L2 norm C (one norm over all the leaves, flattened), gives every participating client
weight 1 (DP-FedAvg averages clipped updates uniformly; data-size weights would raise the
sensitivity), and with ``adaptive`` moves C towards the ``target_quantile`` of the update norms
(Andrew et al. 2021: C ← C·exp(−η(b̃ − γ)) with b̃ the noisy share of unclipped updates).
``gaussian_sum`` is a ``Reducer``: (Σ_k clipped_k + N(0, std²)) / m with the fixed denominator m
(the expected number of clients), so the released value does not reveal how many took part.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from fedlora_jax.federated.aggregation import AggregationTransform, Reducer

PyTree = Any
Array = jax.Array

NOISE_STREAM, COUNT_STREAM = 0, 1  # fold_in tags of the server key: update noise, count noise


@struct.dataclass
class ClipState:
    """``clip``: C for the next round; ``used``: the C of the last round; ``fraction``: the
    share of last round's participants whose update was clipped (exact: a diagnostic that the
    guarantee does not cover); ``noisy_unclipped``: b̃ (adaptive clipping's private estimate)."""

    clip: Array
    used: Array
    fraction: Array
    noisy_unclipped: Array


def flat_norms(updates: PyTree) -> Array:
    """[K] L2 norm of each client's update over all its leaves, flattened (float32)."""
    leaves = jax.tree.leaves(updates)
    k = leaves[0].shape[0]
    squares = sum(jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(k, -1), 1) for x in leaves)
    return jnp.sqrt(squares)


def clip_rows(updates: PyTree, clip: Array) -> tuple[PyTree, Array]:
    """Each row scaled by min(1, C/‖row‖): rows with norm ≤ C are returned unchanged (factor
    exactly 1). Returns (clipped, norms before clipping)."""
    norms = flat_norms(updates)
    factor = jnp.where(norms > clip, clip / jnp.where(norms > 0, norms, 1.0), 1.0)

    def scale(x: Array) -> Array:
        f = factor.reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(f < 1, x * f.astype(x.dtype), x)

    return jax.tree.map(scale, updates), norms


def clip_updates(
    clip: float,
    *,
    adaptive: bool = False,
    target_quantile: float = 0.5,
    learning_rate: float = 0.2,
    count_stddev: float = 0.0,
    expected_clients: float = 1.0,
) -> AggregationTransform:
    """Per-client clipping to C (adaptive: C follows the target quantile; the clipped count gets
    N(0, count_stddev²), centred so its sensitivity is 1/2, divided by ``expected_clients``)."""

    def init(params: PyTree) -> ClipState:
        c = jnp.float32(clip)
        return ClipState(c, c, jnp.float32(0.0), jnp.float32(0.0))

    def update(updates: PyTree, weights: Array, state: ClipState, info: Any) -> tuple:
        took = weights > 0
        safe = jax.tree.map(
            lambda x: jnp.where(took.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0), updates
        )
        clipped, norms = clip_rows(safe, state.clip)
        was_clipped = took & (norms > state.clip)
        count = jnp.sum(took)
        fraction = jnp.sum(was_clipped) / jnp.maximum(count, 1)
        new_clip, noisy = state.clip, state.noisy_unclipped
        if adaptive:
            centred = jnp.sum(jnp.where(took & ~was_clipped, 0.5, jnp.where(took, -0.5, 0.0)))
            noise = count_stddev * jax.random.normal(jax.random.fold_in(info.key, COUNT_STREAM))
            noisy = (centred + noise) / expected_clients + 0.5
            new_clip = state.clip * jnp.exp(-learning_rate * (noisy - target_quantile))
        state = ClipState(new_clip, state.clip, fraction, noisy)
        return clipped, took.astype(jnp.float32), state

    return AggregationTransform(init, update)


def gaussian_sum(noise_std: float | Array, denominator: float) -> Reducer:
    """(Σ_{w>0} u_k + N(0, noise_std²) per coordinate) / denominator, noise from the server key."""

    def reduce(updates: PyTree, weights: Array, key: Array | None = None) -> PyTree:
        assert key is not None, "gaussian_sum needs the server key (RoundInfo.key)"
        leaves, treedef = jax.tree.flatten(updates)
        keys = jax.random.split(jax.random.fold_in(key, NOISE_STREAM), len(leaves))
        took = weights > 0

        def one(u: Array, k: Array) -> Array:
            rows = jnp.where(took.reshape((-1,) + (1,) * (u.ndim - 1)), u, 0).astype(jnp.float32)
            noise = noise_std * jax.random.normal(k, u.shape[1:], jnp.float32)
            return ((jnp.sum(rows, 0) + noise) / denominator).astype(u.dtype)

        return treedef.unflatten([one(u, k) for u, k in zip(leaves, keys, strict=True)])

    return reduce
