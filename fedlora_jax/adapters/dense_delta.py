"""Kind ``dense_delta`` (FedGaLore): a full-size update ΔW [in,out] of the target matrix.

GaLore trains the full matrix through a low-rank gradient projection, so the trainable state is
ΔW itself (zeros at start); the forward adds ``x @ ΔW`` and merging is plain addition.
"""

from __future__ import annotations

import jax.numpy as jnp

from fedlora_jax.adapters.base import AdapterConfig, AdapterKind, Array, Leaf, register_kind


def init(key: Array, in_features: int, out_features: int, cfg: AdapterConfig) -> Leaf:
    del key, cfg  # deterministic zeros: the base model is unchanged at start
    return {"dW": jnp.zeros((in_features, out_features), jnp.float32)}


def apply(leaf: Leaf, x: Array, cfg: AdapterConfig, dropout_key: Array | None) -> Array:
    """x @ ΔW; no dropout (``dropout_key`` is ignored: GaLore trains the weight itself)."""
    del cfg, dropout_key
    return x @ leaf["dW"].astype(x.dtype)


def delta_weight(leaf: Leaf, cfg: AdapterConfig) -> Array:
    return leaf["dW"]


KIND = register_kind(
    AdapterKind(name="dense_delta", init=init, apply=apply, delta_weight=delta_weight)
)
