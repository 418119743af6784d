"""FedSA-LoRA (Guo et al. 2025, "Selective aggregation for LoRA in federated learning").

A learns general knowledge and is shared (FedAvg); B learns client-specific knowledge and stays
on the client. Personal model = global A + the client's own B.

Our choice for the *global* model (the paper evaluates personal models only): global A + the
data-weighted mean of the clients' B, weighted by each client's latest aggregation weight (data
size); uniform before any aggregation. It is an evaluation construct: the protocol itself never
uploads B.
"""

from __future__ import annotations

import jax.numpy as jnp

from fedlora_jax.adapters import init_adapters
from fedlora_jax.algorithms.base import (
    Algorithm,
    Array,
    ClientTraining,
    Phase,
    PyTree,
    register,
)
from fedlora_jax.algorithms.common import (
    Batch,
    init_client_states,
    label_by_key,
    merge_trees,
    replicate,
    require_kind,
    select_keys,
    train_client,
)
from fedlora_jax.federated.aggregation import fedavg
from fedlora_jax.federated.local import make_loss_fn, make_optimizer


@register("fedsa_lora")
def fedsa_lora(training: ClientTraining) -> Algorithm:
    """server_state {"A", "weights"[N]}; client_states {"B"[N], "rounds"[N], "opt_state"?}."""
    require_kind("fedsa_lora", training, ("lora",))
    steps = training.local_steps
    loss_fn = make_loss_fn(training)
    labels = label_by_key({"A": "global", "B": "local"})
    tx = make_optimizer(training, labels, steps)

    def init(key: Array, base: PyTree, num_clients: int) -> tuple[PyTree, PyTree]:
        adapters = init_adapters(key, training.model, training.adapter)
        clients = init_client_states(training, tx, adapters, num_clients)
        clients["B"] = replicate(select_keys(adapters, ("B",)), num_clients)
        server = {"A": select_keys(adapters, ("A",)), "weights": jnp.zeros((num_clients,))}
        return server, clients

    def broadcast(server: PyTree, client_ids: Array) -> PyTree:
        return server["A"]

    def client_update(
        base: PyTree, payload: PyTree, client_state: PyTree, batches: Batch, key: Array
    ) -> tuple[PyTree, PyTree, dict[str, Array]]:
        params = merge_trees(payload, client_state["B"])
        rest = {k: v for k, v in client_state.items() if k != "B"}
        params, rest, metrics = train_client(loss_fn, tx, base, params, rest, batches, key, labels)
        return select_keys(params, ("A",)), {**rest, "B": select_keys(params, ("B",))}, metrics

    def aggregate(server: PyTree, uploads: PyTree, weights: Array, client_ids: Array) -> PyTree:
        seen = (
            server["weights"]
            .at[client_ids]
            .set(jnp.where(weights > 0, weights, server["weights"][client_ids]))
        )
        return {"A": fedavg(uploads, weights), "weights": seen}

    def models(server: PyTree, client_states: PyTree) -> tuple[PyTree | None, PyTree | None]:
        w = server["weights"]
        w = jnp.where(jnp.sum(w) > 0, w, jnp.ones_like(w))
        global_adapters = merge_trees(server["A"], fedavg(client_states["B"], w))
        n = w.shape[0]
        return global_adapters, merge_trees(replicate(server["A"], n), client_states["B"])

    phase = Phase("train", steps, broadcast, client_update, aggregate)
    return Algorithm("fedsa_lora", init, (phase,), models)
