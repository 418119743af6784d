"""Local-only: every client trains its own adapter on its own data; nothing is communicated.

All clients start from the same initial adapter (same key). There is no global model.
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
from fedlora_jax.federated.local import make_loss_fn, make_optimizer


@register("local_only")
def local_only(training: ClientTraining) -> Algorithm:
    """server_state {}; client_states {"adapters"[N], "rounds"[N], "opt_state" if persistent}."""
    steps = training.local_steps
    loss_fn = make_loss_fn(training)
    labels = label_all("local")
    tx = make_optimizer(training, labels, steps)

    def init(key: Array, base: PyTree, num_clients: int) -> tuple[PyTree, PyTree]:
        adapters = init_adapters(key, training.model, training.adapter)
        clients = init_client_states(training, tx, adapters, num_clients)
        return {}, {**clients, "adapters": replicate(adapters, num_clients)}

    def broadcast(server: PyTree, client_ids: Array) -> PyTree:
        return {}

    def client_update(
        base: PyTree, payload: PyTree, client_state: PyTree, batches: Batch, key: Array
    ) -> tuple[PyTree, PyTree, dict[str, Array]]:
        params = client_state["adapters"]
        rest = {k: v for k, v in client_state.items() if k != "adapters"}
        params, rest, metrics = train_client(loss_fn, tx, base, params, rest, batches, key, labels)
        return {}, {**rest, "adapters": params}, metrics

    def models(server: PyTree, client_states: PyTree) -> tuple[PyTree | None, PyTree | None]:
        return None, client_states["adapters"]

    phase = Phase("train", steps, broadcast, client_update, None)
    return Algorithm("local_only", init, (phase,), models)
