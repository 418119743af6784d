"""Local-only: every client trains its own adapter on its own data; nothing is communicated.

All clients start from the same initial adapter (same key). There is no global model.
"""

from __future__ import annotations

from fedlora_jax.adapters import init_adapters
from fedlora_jax.algorithms.base import Algorithm, ClientTraining, Phase, register
from fedlora_jax.algorithms.common import init_client_states, label_all, replicate, train_client
from fedlora_jax.federated.local import make_loss_fn, make_optimizer


@register("local_only")
def local_only(training: ClientTraining) -> Algorithm:
    """server_state {}; client_states {"adapters"[N], "rounds"[N], "opt_state" if persistent}."""
    steps = training.local_steps
    loss_fn = make_loss_fn(training)
    labels = label_all("local")
    tx = make_optimizer(training, labels, steps)

    def init(key, base, num_clients):
        adapters = init_adapters(key, training.model, training.adapter)
        clients = init_client_states(training, tx, adapters, num_clients)
        return {}, {**clients, "adapters": replicate(adapters, num_clients)}

    def broadcast(server, client_ids):
        return {}

    def client_update(base, payload, client_state, batches, key):
        params = client_state["adapters"]
        rest = {k: v for k, v in client_state.items() if k != "adapters"}
        params, rest, metrics = train_client(
            loss_fn, tx, base, params, rest, batches, key, labels
        )
        return {}, {**rest, "adapters": params}, metrics

    def models(server, client_states):
        return None, client_states["adapters"]

    phase = Phase("train", steps, broadcast, client_update, None)
    return Algorithm("local_only", init, (phase,), models)
