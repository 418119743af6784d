"""RoLoRA (Chen et al. 2025, "Robust federated finetuning of LLMs via alternating optimization
of LoRA"): rounds alternately train and aggregate B (A frozen) and A (B frozen).

With one factor common to all clients, averaging the other is exact::

    B-round (even rounds):  B ← Σ_k p_k B_k,   and Σ_k p_k B_k A = B A
    A-round (odd rounds):   A ← Σ_k p_k A_k,   and Σ_k p_k B A_k = B A

p_k are the data-size weights. The round's parity comes from ``RoundInfo.round`` (no counter);
the frozen factor is routed to a zero update (bitwise unchanged). Clients download A and B
(a client sampled now may have missed the last round) and upload only the factor they trained:
the upload keeps both arrays (one compiled program) but reports ``up_rank`` 0 for the frozen
one, so the byte count is what is sent.

Our choices: B trains first, since B = 0 at init gives A a zero gradient; the optimizer state is
fresh each round (``optim.optimizer_state=persistent`` is refused: the two factors alternate).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedlora_jax.algorithms.base import Algorithm, placement_labels, register, require_kind
from fedlora_jax.algorithms.fedavg import all_shared, fedavg_family
from fedlora_jax.algorithms.fedex_lora import map_modules
from fedlora_jax.algorithms.rank_mask import RankOptions, ranked
from fedlora_jax.algorithms.training import (
    ClientTraining,
    local_train,
    make_loss_fn,
    make_optimizer,
)
from fedlora_jax.federated.aggregation import weighted_mean

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RoLoRAOptions(RankOptions):
    pass


def trains_a(round_idx: Array) -> Array:
    """Odd rounds train A, even rounds train B."""
    return round_idx % 2 == 1


@register("rolora", RoLoRAOptions)
def rolora(training: ClientTraining, options: RoLoRAOptions) -> Algorithm:
    require_kind("rolora", training, ("lora",))
    if training.optimizer_state != "fresh":
        raise ValueError(
            "rolora alternates the trained factor each round: optim.optimizer_state must be 'fresh'"
        )
    base_alg = fedavg_family("rolora", training, all_shared(training))
    loss_fn = make_loss_fn(training)
    steps, r = training.local_steps, float(training.adapter.r)
    labels = {
        f: placement_labels({"A": "shared" if f == "A" else "frozen",
                             "B": "shared" if f == "B" else "frozen"})
        for f in "AB"
    }  # fmt: skip
    txs = {f: make_optimizer(training, labels[f], steps) for f in "AB"}

    def client_update(base, payload, state, batches, key, info):
        received = payload["params"]

        def train(f):
            def branch(_):
                tx = txs[f]
                params, _, metrics = local_train(
                    loss_fn, base, received, tx, tx.init(received), batches, key, labels[f]
                )
                return params, metrics

            return branch

        a = trains_a(info.round)
        params, metrics = jax.lax.cond(a, train("A"), train("B"), None)
        sent = {"up_rank/A": jnp.where(a, r, 0.0), "up_rank/B": jnp.where(a, 0.0, r)}
        return params, state, {**metrics, **sent}

    def aggregate(server, uploads, weights, client_ids, info):
        mean = weighted_mean(uploads, weights)
        a = trains_a(info.round)

        def pick(old, new):
            return {**old, "A": jnp.where(a, new["A"], old["A"]),
                    "B": jnp.where(a, old["B"], new["B"])}  # fmt: skip

        seen = server.seen.at[client_ids].set(
            jnp.where(weights > 0, weights, server.seen[client_ids])
        )
        return server.replace(params=map_modules(pick, server.params, mean), seen=seen)

    phase = dataclasses.replace(
        base_alg.phases[0], client_update=client_update, aggregate=aggregate
    )
    alg = dataclasses.replace(base_alg, phases=(phase,))
    return ranked(alg, training.adapter.r, options)
