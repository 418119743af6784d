"""Kind ``lora``: A [r,in], B [out,r], output scale·((drop(x) @ A.T) @ B.T), scale = α/r.

Also the primitives the other kinds reuse (PEFT's Kaiming init, inverted dropout, the low-rank
product), so every kind initialises and drops out exactly as PEFT does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedlora_jax.adapters.base import AdapterConfig, AdapterKind, Array, Leaf, register_kind


def kaiming_bound(fan_in: int) -> float:
    """Bound of torch's ``kaiming_uniform_(a=sqrt(5))``: gain·sqrt(3/fan_in) = 1/sqrt(fan_in)."""
    gain = math.sqrt(2.0 / (1.0 + 5.0))  # leaky_relu gain with negative slope a = sqrt(5)
    return gain * math.sqrt(3.0 / fan_in)


def kaiming_uniform(key: Array, shape: tuple[int, ...], fan_in: int) -> Array:
    """U(-b, b) with b = kaiming_bound(fan_in): PEFT's default init of lora_A (fan_in = in)."""
    b = kaiming_bound(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -b, b)


def dropout(x: Array, rate: float, key: Array | None) -> Array:
    """Inverted dropout (as torch ``nn.Dropout``); identity when key is None (eval) or rate 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def low_rank(x: Array, A: Array, B: Array, scale: float) -> Array:
    """scale·((x @ A.T) @ B.T) in x's dtype; never forms the full [in,out] product."""
    A = A.astype(x.dtype)
    B = B.astype(x.dtype)
    return (scale * ((x @ A.T) @ B.T)).astype(x.dtype)


def init(key: Array, in_features: int, out_features: int, cfg: AdapterConfig) -> Leaf:
    """A Kaiming-uniform (fan_in = in), B = 0: ΔW = 0 at start, as PEFT."""
    return {
        "A": kaiming_uniform(key, (cfg.r, in_features), in_features),
        "B": jnp.zeros((out_features, cfg.r), jnp.float32),
    }


def apply(leaf: Leaf, x: Array, cfg: AdapterConfig, dropout_key: Array | None) -> Array:
    return low_rank(dropout(x, cfg.dropout, dropout_key), leaf["A"], leaf["B"], cfg.scale)


def factors(leaf: Leaf, cfg: AdapterConfig) -> Leaf:
    return {"A": leaf["A"], "B": leaf["B"]}


def delta_from_factors(A: Array, B: Array, scale: float) -> Array:
    """ΔW = scale·(B@A).T in (in, out) layout, so W0 + ΔW is the merged (in, out) weight."""
    return scale * (B @ A).T


def delta_weight(leaf: Leaf, cfg: AdapterConfig) -> Array:
    return delta_from_factors(leaf["A"], leaf["B"], cfg.scale)


KIND = register_kind(
    AdapterKind(name="lora", init=init, apply=apply, delta_weight=delta_weight, factors=factors)
)
