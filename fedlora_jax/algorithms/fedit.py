"""FedIT (Zhang et al. 2024, "Towards building the federated GPT"): FedAvg of LoRA A and B.

Clients start each round from the global adapter, train every adapter array, upload it; the
server takes the data-weighted mean. Personal model = the global one (replicated per client).
Works for any adapter kind whose arrays are all shared (lora, decomposed).
"""

from __future__ import annotations

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
    label_all,
    replicate,
    train_client,
)
from fedlora_jax.federated.aggregation import fedavg
from fedlora_jax.federated.local import make_loss_fn, make_optimizer


@register("fedit")
def fedit(training: ClientTraining) -> Algorithm:
    """server_state {"adapters"}; client_states {"rounds"[N], "opt_state" if persistent}."""
    steps = training.local_steps
    loss_fn = make_loss_fn(training)
    labels = label_all("global")
    tx = make_optimizer(training, labels, steps)

    def init(key: Array, base: PyTree, num_clients: int) -> tuple[PyTree, PyTree]:
        adapters = init_adapters(key, training.model, training.adapter)
        return {"adapters": adapters}, init_client_states(training, tx, adapters, num_clients)

    def broadcast(server: PyTree, client_ids: Array) -> PyTree:
        return server["adapters"]

    def client_update(
        base: PyTree, payload: PyTree, client_state: PyTree, batches: Batch, key: Array
    ) -> tuple[PyTree, PyTree, dict[str, Array]]:
        return train_client(loss_fn, tx, base, payload, client_state, batches, key, labels)

    def aggregate(server: PyTree, uploads: PyTree, weights: Array, client_ids: Array) -> PyTree:
        return {"adapters": fedavg(uploads, weights)}

    def models(server: PyTree, client_states: PyTree) -> tuple[PyTree | None, PyTree | None]:
        return server["adapters"], replicate(server["adapters"], client_states["rounds"].shape[0])

    phase = Phase("train", steps, broadcast, client_update, aggregate)
    return Algorithm("fedit", init, (phase,), models)
