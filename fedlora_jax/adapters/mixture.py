"""Kind ``mixture`` (FedALT): Rest-of-World LoRA + individual LoRA, mixed per token by a router.

Leaf: ``A0 [r,in], B0 [out,r]`` (RoW, frozen on the client), ``A1 [r,in], B1 [out,r]`` (the
client's individual LoRA) and ``G [2,in]`` (bias-free router). Output, as the official code
(``jmbian/FedALT``, ``peft/tuners/lora.py`` with ``asymmetric=False``) computes it::

    g = softmax(x @ G.T)                       # per token, fp32, on the raw layer input
    y = g0·s·B0 A0 drop(x) + g1·s·B1 A1 drop(x)   # ONE dropout sample shared by both branches

The mixture depends on the input, so it has no single ΔW or (A, B) pair: ``delta_weight`` refuses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedlora_jax.adapters.base import AdapterConfig, AdapterKind, Array, Leaf, register_kind
from fedlora_jax.adapters.lora import dropout, kaiming_uniform, low_rank

NUM_EXPERTS = 2  # 0 = Rest-of-World, 1 = individual


def mixer_weights(leaf: Leaf, x: Array) -> Array:
    """Per-token softmax gate [..., 2] in fp32 (the official code's ``softmax(dtype=float32)``)."""
    logits = x.astype(jnp.float32) @ leaf["G"].astype(jnp.float32).T
    return jax.nn.softmax(logits, axis=-1)


def init(key: Array, in_features: int, out_features: int, cfg: AdapterConfig) -> Leaf:
    """A1 and G Kaiming-uniform (as the official code's lora_A*/lora_route), B1 = 0, RoW = 0.

    The official code also Kaiming-inits A0, but with B0 = 0 its branch is zero either way and the
    server overwrites both with the RoW average after round 1; zeros make "RoW contributes nothing
    in round 1" hold exactly, gradients included.
    """
    k_a, k_g = jax.random.split(key)
    zeros_a = jnp.zeros((cfg.r, in_features), jnp.float32)
    zeros_b = jnp.zeros((out_features, cfg.r), jnp.float32)
    return {
        "A0": zeros_a,
        "B0": zeros_b,
        "A1": kaiming_uniform(k_a, (cfg.r, in_features), in_features),
        "B1": zeros_b,
        "G": kaiming_uniform(k_g, (NUM_EXPERTS, in_features), in_features),
    }


def apply(leaf: Leaf, x: Array, cfg: AdapterConfig, dropout_key: Array | None) -> Array:
    g = mixer_weights(leaf, x).astype(x.dtype)
    xd = dropout(x, cfg.dropout, dropout_key)
    row = low_rank(xd, leaf["A0"], leaf["B0"], cfg.scale)
    individual = low_rank(xd, leaf["A1"], leaf["B1"], cfg.scale)
    return g[..., 0:1] * row + g[..., 1:2] * individual


def delta_weight(leaf: Leaf, cfg: AdapterConfig) -> Array:
    raise ValueError(
        "adapter.kind='mixture' has no input-independent ΔW (the router mixes per token); "
        "run it through the forward instead of merging it into the base weights"
    )


KIND = register_kind(AdapterKind(name="mixture", init=init, apply=apply, delta_weight=delta_weight))
