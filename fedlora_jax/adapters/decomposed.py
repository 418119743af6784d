"""Kind ``decomposed`` (FedLoRA-Optimizer): LoRA factors split into magnitude and direction.

Row-wise (``norm_axis="row"``, the default)::

    A = diag(A_M) · rownorm(A_D)     A_M [r],   A_D [r,in]
    B = diag(B_M) · rownorm(B_D)     B_M [out], B_D [out,r]

Column-wise (``norm_axis="col"``)::

    A = colnorm(A_D) · diag(A_M)     A_M [in],  A_D [r,in]   (one magnitude per input feature)
    B = colnorm(B_D) · diag(B_M)     B_M [r],   B_D [out,r]  (one magnitude per rank component)

where ``rownorm(D)[i,:] = D[i,:] / sqrt(‖D[i,:]‖² + ε)`` and ``colnorm`` does the same per column
(ε = ``cfg.norm_eps``). Directions are stored unnormalised and normalised in the forward pass
(DoRA-style), so the optimiser moves them freely and only their direction reaches the output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedlora_jax.adapters.base import AdapterConfig, AdapterKind, Array, Leaf, register_kind
from fedlora_jax.adapters.lora import delta_from_factors, dropout, kaiming_uniform, low_rank

# cfg.init == "paper_literal": every B magnitude starts at this value, so B has rows (row-wise) or
# columns (col-wise) of norm 1e-3: ΔW is non-zero but tiny next to A's rows of norm ≈ 1/sqrt(3).
PAPER_LITERAL_B_MAGNITUDE = 1e-3


def _reduce_axis(cfg: AdapterConfig) -> int:
    """Axis the norm runs over: row-wise normalises each row (axis 1), col-wise each column."""
    return 1 if cfg.norm_axis == "row" else 0


def _norm(D: Array, axis: int, eps: float) -> Array:
    """sqrt(‖·‖² + ε) along ``axis`` (kept), with ε inside so a zero direction stays finite."""
    return jnp.sqrt(jnp.sum(jnp.square(D), axis=axis, keepdims=True) + eps)


def _compose(M: Array, D: Array, axis: int, eps: float) -> Array:
    return jnp.expand_dims(M, axis) * D / _norm(D, axis, eps)


def recompose(leaf: Leaf, cfg: AdapterConfig) -> tuple[Array, Array]:
    """(A, B) of a decomposed leaf, normalised in fp32."""
    axis, eps = _reduce_axis(cfg), cfg.norm_eps
    f32 = {k: v.astype(jnp.float32) for k, v in leaf.items()}
    return _compose(f32["A_M"], f32["A_D"], axis, eps), _compose(f32["B_M"], f32["B_D"], axis, eps)


def decompose(A: Array, B: Array, cfg: AdapterConfig) -> Leaf:
    """Split LoRA factors so that ``recompose`` gives A and B back (up to rounding).

    The magnitude is the same ε-norm the forward divides by, so M·D/norm(D) = D exactly.
    """
    axis, eps = _reduce_axis(cfg), cfg.norm_eps
    return {
        "A_M": jnp.squeeze(_norm(A, axis, eps), axis),
        "A_D": A,
        "B_M": jnp.squeeze(_norm(B, axis, eps), axis),
        "B_D": B,
    }


def init(key: Array, in_features: int, out_features: int, cfg: AdapterConfig) -> Leaf:
    """A Kaiming-uniform split into (A_M, A_D); B_D random unit rows/cols; B_M = 0 (ΔW = 0).

    ``cfg.init == "paper_literal"`` sets B_M = PAPER_LITERAL_B_MAGNITUDE instead of 0.
    """
    k_a, k_b = jax.random.split(key)
    axis = _reduce_axis(cfg)
    leaf = decompose(
        kaiming_uniform(k_a, (cfg.r, in_features), in_features),
        jnp.zeros((out_features, cfg.r), jnp.float32),
        cfg,
    )
    B_D = jax.random.normal(k_b, (out_features, cfg.r), jnp.float32)
    B_D = B_D / jnp.linalg.norm(B_D, axis=axis, keepdims=True)
    b_m = 0.0 if cfg.init == "default" else PAPER_LITERAL_B_MAGNITUDE
    leaf["B_D"] = B_D
    leaf["B_M"] = jnp.full(B_D.shape[1 - axis], b_m, jnp.float32)
    return leaf


def apply(leaf: Leaf, x: Array, cfg: AdapterConfig, dropout_key: Array | None) -> Array:
    A, B = recompose(leaf, cfg)
    return low_rank(dropout(x, cfg.dropout, dropout_key), A, B, cfg.scale)


def factors(leaf: Leaf, cfg: AdapterConfig) -> Leaf:
    A, B = recompose(leaf, cfg)
    return {"A": A, "B": B}


def delta_weight(leaf: Leaf, cfg: AdapterConfig) -> Array:
    A, B = recompose(leaf, cfg)
    return delta_from_factors(A, B, cfg.scale)


KIND = register_kind(
    AdapterKind(
        name="decomposed", init=init, apply=apply, delta_weight=delta_weight, factors=factors
    )
)
