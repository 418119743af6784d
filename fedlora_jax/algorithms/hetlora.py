"""HetLoRA (Cho et al., EMNLP 2024, "Heterogeneous LoRA for federated fine-tuning of on-device
foundation models").

Clients train LoRA at their own ranks r_k ≤ r_max; the server keeps r_max-sized factors. A round:

    distribution:  client k receives B[:, :r_k] and A[:r_k]                          (truncation)
    local:         min F_k(B, A) + λ Σ_m ‖B_m[:, t:r_k] A_m[t:r_k]‖_F,   t = max(r_min, ⌊γ r_k⌋)
    self-pruning:  r_k ← t  when that tail norm after training < τ × its norm as received
    aggregation:   S_k = ‖B_k A_k‖_F,  p_k = S_k / Σ_j S_j,  A = Σ p_k pad(A_k),  B = Σ p_k pad(B_k)

(m: the adapted modules; pad: zero-padding to r_max, which the r_max-sized factors of
``rank_mask`` already are.) The sparsity weights p_k replace the data-size weights; a client the
engine excluded (weight 0) gets p_k = 0. Uploads: A_k, B_k at the (possibly pruned) rank;
downloads: A, B at the client's rank before pruning. A pruned rank persists (client state).

Our choices where the paper is silent or where we did not confirm it in this session: the tail
is the last components [t, r_k) with t = ⌊γ r_k⌋ (float32) but never below ``min_rank``, and a
prune keeps exactly t (so nothing is pruned at r_k ≤ min_rank); the tail norm is the Frobenius
norm of the tail's product, summed over the modules (one rank per client); "the norm became
small" is "after < τ × as received" with τ = ``threshold`` (1: it decreased during local
training; 0: never prune); S_k is per module by default (``sparsity=client``: one S_k from all
the client's modules, √Σ_m ‖B_m A_m‖²); when every valid S_k is 0 the data-size weights are used;
the defaults γ = 0.99, λ = 0.01 are ours. The client's reported loss includes λ × tail.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fedlora_jax.algorithms.base import (
    Algorithm,
    OptionsError,
    placement_labels,
    register,
    require_kind,
)
from fedlora_jax.algorithms.fedavg import all_shared, fedavg_family
from fedlora_jax.algorithms.fedex_lora import map_modules
from fedlora_jax.algorithms.rank_mask import RankOptions, rank_mask, ranked
from fedlora_jax.algorithms.training import (
    ClientTraining,
    local_train,
    make_loss_fn,
    make_optimizer,
    opt_state_or_init,
)
from fedlora_jax.federated.aggregation import weighted_mean

Array = jax.Array
Tree = dict[str, Any]
SCOPES = ("module", "client")


@dataclasses.dataclass(frozen=True)
class HetLoRAOptions(RankOptions):
    decay: float = 0.99  # γ: the tail is the components [⌊γ r_k⌋, r_k); a prune keeps ⌊γ r_k⌋
    reg: float = 0.01  # λ: weight of the tail-norm regulariser in the client loss
    threshold: float = 1.0  # τ: prune when the tail norm after training < τ × before; 0: never
    min_rank: int = 1  # no client is pruned below this rank
    sparsity: str = "module"  # sparsity weights per adapted module | per client ("client")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.decay <= 1:
            raise ValueError(f"decay={self.decay} must lie in (0, 1]")
        if self.reg < 0 or self.threshold < 0:
            raise ValueError(f"reg={self.reg} and threshold={self.threshold} must be >= 0")
        if self.min_rank < 1:
            raise ValueError(f"min_rank={self.min_rank} must be >= 1")
        if self.sparsity not in SCOPES:
            raise ValueError(f"sparsity={self.sparsity!r} is not allowed; allowed: module, client")


def _sqrt0(x: Array) -> Array:
    """√max(x, 0) with gradient 0 at 0 (a zero tail, e.g. B = 0 at init, must not give NaN)."""
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def product_norm(A: Array, B: Array, keep: Array) -> Array:
    """‖B diag(keep) A‖_F from the r×r Grams (never the [out, in] product). A [r, in], B [out, r],
    keep [r] selects rank components."""
    A, B = A.astype(jnp.float32) * keep[:, None], B.astype(jnp.float32) * keep[None, :]
    return _sqrt0(jnp.sum((B.T @ B) * (A @ A.T)))


def tail_start(rank: Array, decay: float, min_rank: int) -> Array:
    """t = max(min_rank, ⌊γ r⌋): the first tail component, and the rank a prune keeps."""
    t = jnp.floor(jnp.float32(decay) * jnp.asarray(rank, jnp.float32)).astype(jnp.int32)
    return jnp.maximum(t, min_rank)


def tail_norm(params: Tree, rank: Array, decay: float, min_rank: int) -> Array:
    """Σ_m ‖B_m[:, t:r] A_m[t:r]‖_F over the modules of one client's ``params`` at rank r."""
    t = tail_start(rank, decay, min_rank)

    def one(leaf: Tree) -> Array:
        r_max = leaf["A"].shape[0]
        keep = rank_mask(rank, r_max) * (jnp.arange(r_max) >= t)
        return product_norm(leaf["A"], leaf["B"], keep)

    return sum(jax.tree.leaves(map_modules(one, params)))


def pruned_rank(trained: Tree, received: Tree, rank: Array, options: HetLoRAOptions) -> Array:
    """The client's rank after self-pruning: t when the tail norm fell below τ × as received."""
    before = tail_norm(received, rank, options.decay, options.min_rank)
    after = tail_norm(trained, rank, options.decay, options.min_rank)
    t = jnp.minimum(tail_start(rank, options.decay, options.min_rank), rank)
    return jnp.where(after < options.threshold * before, t, rank)


def sparsity_weighted_mean(scope: str):
    """Reducer: Σ_k p_k u_k per module with p_k ∝ ‖B_k A_k‖_F (0 for weight-0 clients, whose
    rows may hold NaN); the data-size weights when every valid norm is 0."""

    def reduce(uploads: Tree, weights: Array, key: Array | None = None) -> Tree:
        valid = weights > 0

        def norms(up: Tree) -> Array:
            A = jnp.where(valid[:, None, None], up["A"], 0.0)
            B = jnp.where(valid[:, None, None], up["B"], 0.0)
            ones = jnp.ones((A.shape[1],), jnp.float32)
            return jax.vmap(product_norm, in_axes=(0, 0, None))(A, B, ones)

        s = map_modules(norms, uploads)
        if scope == "client":
            total = _sqrt0(sum(jnp.square(x) for x in jax.tree.leaves(s)))
            s = jax.tree.map(lambda _: total, s)

        def mean(up: Tree, norm: Array) -> Tree:
            return weighted_mean(up, jnp.where(jnp.sum(norm) > 0, norm, weights))

        return map_modules(mean, uploads, s)

    return reduce


@register("hetlora", HetLoRAOptions)
def hetlora(training: ClientTraining, options: HetLoRAOptions) -> Algorithm:
    require_kind("hetlora", training, ("lora",))
    r = training.adapter.r
    if options.min_rank > r:
        raise OptionsError(f"algorithm.options.min_rank={options.min_rank} exceeds adapter.r={r}")
    placement = all_shared(training)
    alg = fedavg_family(
        "hetlora", training, placement, reduce=sparsity_weighted_mean(options.sparsity)
    )
    loss_fn = make_loss_fn(training)
    labels = placement_labels(placement)
    tx = make_optimizer(training, labels, training.local_steps)
    persistent = training.optimizer_state == "persistent"

    def client_update(base, payload, state, batches, key, info):
        received, rank = payload["params"], payload["rank"]  # rank: from rank_mask's wrapper

        def loss(base_, params, batch, step_key):
            value, aux = loss_fn(base_, params, batch, step_key)
            tail = tail_norm(params, rank, options.decay, options.min_rank)
            return value + options.reg * tail, aux

        opt_state = opt_state_or_init(tx, received, state.opt_state if persistent else None)
        params, opt_state, metrics = local_train(
            loss, base, received, tx, opt_state, batches, key, labels
        )
        return params, state.replace(opt_state=opt_state if persistent else {}), metrics

    def prune(trained: Tree, received: Tree, rank: Array) -> Array:
        return pruned_rank(trained, received, rank, options)

    phase = dataclasses.replace(alg.phases[0], client_update=client_update)
    return ranked(dataclasses.replace(alg, phases=(phase,)), r, options, prune=prune)
