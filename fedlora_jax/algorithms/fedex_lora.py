"""FedEx-LoRA (Singhal et al. 2024, "FedEx-LoRA: exact aggregation for federated and efficient
fine-tuning of foundation models").

FedIT averages A and B separately, so the global product B̄Ā is not the average of the clients'
products. FedEx-LoRA keeps FedIT's Ā = Σ p_k A_k and B̄ = Σ p_k B_k and folds the residual into
the frozen base weight, which the server owns (placement ``server``, a ``base_delta`` [in, out]
applied in every forward)::

    ΔW_res = Σ_k p_k B_k A_k − B̄ Ā
    W0 ← W0 + s · ΔW_res          (s = α / r)

so W0 + s·B̄Ā = W0_old + s·Σ_k p_k B_k A_k exactly. p_k are the data-size weights (0 for an
excluded client). Clients download Ā, B̄ and the base delta (dense [in, out]: what we
broadcast and count), upload A_k and B_k.

With ``federated.client_ranks`` the factors are zero-padded to r_max = adapter.r (our
extension; the paper uses one rank): the residual makes the aggregate exact for any ranks, and
each client starts from Ā, B̄ truncated to its rank (plus the base delta).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fedlora_jax.adapters import init_adapters
from fedlora_jax.adapters.base import BASE_DELTA
from fedlora_jax.algorithms.base import Algorithm, register, require_kind
from fedlora_jax.algorithms.fedavg import fedavg_family
from fedlora_jax.algorithms.rank_mask import RankOptions, ranked
from fedlora_jax.algorithms.training import ClientTraining
from fedlora_jax.federated.aggregation import normalise_weights

Array = jax.Array
Tree = dict[str, Any]

PLACEMENT = {"A": "shared", "B": "shared", BASE_DELTA: "server"}


@dataclasses.dataclass(frozen=True)
class FedExLoRAOptions(RankOptions):
    pass


def with_base_delta(training: ClientTraining) -> Callable[[Array], Tree]:
    """init_params: the LoRA init plus a zero base delta [in, out] in every leaf."""

    def make(key: Array) -> Tree:
        tree = init_adapters(key, training.model, training.adapter)
        return map_modules(
            lambda leaf: {**leaf, BASE_DELTA: jnp.zeros(leaf["A"].shape[1:] + leaf["B"].shape[:1])},
            tree,
        )

    return make


def map_modules(fn: Callable[..., Tree], *trees: Tree) -> Tree:
    """``fn`` on every module leaf (a dict holding ``A``) of parallel trees."""
    head = trees[0]
    if "A" in head:
        return fn(*trees)
    return {k: map_modules(fn, *(t[k] for t in trees)) for k in head}


def stacked_product(A: Array, B: Array, weights: Array) -> Array:
    """Σ_k p_k B_k A_k [out, in] as one product of the stacked factors (FLoRA's stacking):
    [p_1 B_1 | ... | p_K B_K] @ [A_1; ...; A_K]. A [K, r, in], B [K, out, r]; p normalised,
    excluded rows (weight 0) masked out before the product (their rows may hold anything)."""
    p = normalise_weights(weights)
    keep = (p > 0)[:, None, None]
    A = jnp.where(keep, A, 0.0).astype(jnp.float32)
    B = jnp.where(keep, B, 0.0).astype(jnp.float32) * p[:, None, None]
    k, r, n_in = A.shape
    B_stack = jnp.moveaxis(B, 0, 1).reshape(B.shape[1], k * r)  # [out, K·r]
    return B_stack @ A.reshape(k * r, n_in)


def fold(scale: float, product: Callable[[Tree, Tree, Array], Array]) -> Callable[..., Tree]:
    """finalize hook: base_delta += scale · product(new leaf, uploaded leaf).T per module."""

    def finalize(params: Tree, uploads: Tree, weights: Array, info: Any) -> Tree:
        def one(new: Tree, up: Tree) -> Tree:
            delta = new[BASE_DELTA] + scale * product(new, up, weights).T
            return {**new, BASE_DELTA: delta.astype(new[BASE_DELTA].dtype)}

        return map_modules(one, params, uploads)

    return finalize


def residual(new: Tree, up: Tree, weights: Array) -> Array:
    """Σ p_k B_k A_k − B̄ Ā (``new`` holds the weighted means Ā, B̄)."""
    return stacked_product(up["A"], up["B"], weights) - new["B"] @ new["A"]


@register("fedex_lora", FedExLoRAOptions)
def fedex_lora(training: ClientTraining, options: FedExLoRAOptions) -> Algorithm:
    require_kind("fedex_lora", training, ("lora",))
    alg = fedavg_family(
        "fedex_lora",
        training,
        PLACEMENT,
        init_params=with_base_delta(training),
        finalize=fold(training.adapter.scale, residual),
    )
    return ranked(alg, training.adapter.r, options)
