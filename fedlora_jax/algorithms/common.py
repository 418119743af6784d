"""Client-state plumbing shared by the algorithms that keep their own files (FedALT,
FedLoRA-Optimizer, FedGaLore): the optional persistent optimizer state of each client."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedlora_jax.algorithms.base import replicate
from fedlora_jax.algorithms.training import ClientTraining, LossFn, local_train, opt_state_or_init

PyTree = Any
Array = jax.Array
Tree = dict[str, Any]
Batch = Mapping[str, Array]  # one client's batches, leaves [steps, batch, seq]


def raw_key(key: Array) -> Array:
    """A uint32 key (typed keys converted) so it can live in a checkpointed state."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def init_client_states(
    training: ClientTraining, tx: optax.GradientTransformation, params: Tree, n: int
) -> dict[str, Any]:
    """Rows for N clients: the optimizer state when persistent, else nothing."""
    if training.optimizer_state == "persistent":
        return {"opt_state": replicate(tx.init(params), n)}
    return {}


def train_client(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    base: PyTree,
    params: Tree,
    client_state: dict[str, Any],
    batches: Batch,
    key: Array,
    labels: Callable[[Tree], Tree],
) -> tuple[Tree, dict[str, Any], dict[str, Array]]:
    """``local_train`` with the client's own optimizer state if persistent (fresh otherwise);
    returns the trained params, the updated client-state row and the metrics."""
    opt_state = opt_state_or_init(tx, params, client_state.get("opt_state"))
    params, opt_state, metrics = local_train(
        loss_fn, base, params, tx, opt_state, batches, key, labels
    )
    new_state = dict(client_state)
    if "opt_state" in client_state:
        new_state["opt_state"] = opt_state
    return params, new_state, metrics
