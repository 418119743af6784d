"""FFA-LoRA (Sun et al. 2024, "Improving LoRA in privacy-preserving federated learning").

A is drawn from a shared seed and never trained, so it is identical on every client; only B is
trained and FedAvg-ed. The server sends the seed (8 bytes) and B; each client regenerates A from
the seed, so A never crosses the network. Gradients are taken w.r.t. B only (A is a constant of
the loss), which is cheaper than computing and then zeroing dA. Personal model = global.
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
    merge_trees,
    raw_key,
    replicate,
    require_kind,
    select_keys,
    train_client,
)
from fedlora_jax.federated.aggregation import fedavg
from fedlora_jax.federated.local import make_loss_fn, make_optimizer


@register("ffa_lora")
def ffa_lora(training: ClientTraining) -> Algorithm:
    """server_state {"a_key" uint32[2], "B"}; client_states {"rounds"[N], "opt_state"?}."""
    require_kind("ffa_lora", training, ("lora",))
    steps = training.local_steps
    loss_fn = make_loss_fn(training)
    labels = label_all("global")
    tx = make_optimizer(training, labels, steps)

    def frozen_A(a_key: Array) -> PyTree:
        return select_keys(init_adapters(a_key, training.model, training.adapter), ("A",))

    def init(key: Array, base: PyTree, num_clients: int) -> tuple[PyTree, PyTree]:
        a_key = raw_key(key)
        B = select_keys(init_adapters(a_key, training.model, training.adapter), ("B",))
        return {"a_key": a_key, "B": B}, init_client_states(training, tx, B, num_clients)

    def broadcast(server: PyTree, client_ids: Array) -> PyTree:
        return server

    def client_update(
        base: PyTree, payload: PyTree, client_state: PyTree, batches: Batch, key: Array
    ) -> tuple[PyTree, PyTree, dict[str, Array]]:
        A = frozen_A(payload["a_key"])

        def loss_of_B(
            base: PyTree, B: PyTree, batch: Batch, step_key: Array
        ) -> tuple[Array, dict[str, Array]]:
            return loss_fn(base, merge_trees(A, B), batch, step_key)

        return train_client(loss_of_B, tx, base, payload["B"], client_state, batches, key, labels)

    def aggregate(server: PyTree, uploads: PyTree, weights: Array, client_ids: Array) -> PyTree:
        return {"a_key": server["a_key"], "B": fedavg(uploads, weights)}

    def models(server: PyTree, client_states: PyTree) -> tuple[PyTree | None, PyTree | None]:
        adapters = merge_trees(frozen_A(server["a_key"]), server["B"])
        return adapters, replicate(adapters, client_states["rounds"].shape[0])

    phase = Phase("train", steps, broadcast, client_update, aggregate)
    return Algorithm("ffa_lora", init, (phase,), models)
