"""FedALT (Bian et al. 2025, arXiv 2503.11880; official code ``jmbian/FedALT``).

Each client keeps training its own *individual* LoRA (A1, B1) and never resets it to an
aggregate. Shared knowledge arrives as a frozen *Rest-of-World* (RoW) LoRA (A0, B0): for client
i, the unweighted mean of the OTHER clients' individual A and, separately, B. A personal router
G (kind ``mixture``) mixes the two branches per token; it is trained locally, never uploaded and
never aggregated. The uplink is A1, B1 only; the downlink is one RoW per client.

Our choices where the paper and the official code are silent (the official code always runs
every client every round):

- The server keeps its latest copy of every client's (A1, B1). Client i's RoW averages the copies
  of the clients j != i that have uploaded at least once. Before any other client has uploaded
  the RoW is all zeros (B0 = 0), so its branch contributes exactly nothing. Under full
  participation this equals the official code: round 1 trains with a zero RoW branch, and every
  later RoW averages the other N-1 clients' latest LoRAs.
- Every client starts from its own random init (one key per client, split from the run key), as the
  official code's clients each build a fresh PEFT model.
- No single global model exists: ``models`` returns ``None`` as the global adapters. Personal
  model i = the RoW the server would send client i now + client i's own A1, B1 and G.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from fedlora_jax.adapters import init_adapters, label_tree
from fedlora_jax.algorithms.base import (
    Algorithm,
    Models,
    NoOptions,
    Phase,
    PyTree,
    keys_placed,
    merge_trees,
    register,
    replicate,
    require_kind,
    select_keys,
)
from fedlora_jax.algorithms.training import (
    ClientTraining,
    local_train,
    make_loss_fn,
    make_optimizer,
    opt_state_or_init,
)

Array = jax.Array
Tree = dict[str, Any]

# Rest-of-World LoRA (A0, B0): frozen on the client, sent by the server. The client's own LoRA
# (A1, B1): trained and uploaded, and also kept by the client (it never resets to an aggregate).
# The mixer G: personal.
PLACEMENT = {"A0": "frozen", "B0": "frozen", "A1": "shared", "B1": "shared", "G": "personal"}
ROW_KEYS = keys_placed(PLACEMENT, "frozen")
INDIVIDUAL_KEYS = keys_placed(PLACEMENT, "shared")
PERSONAL_KEYS = keys_placed(PLACEMENT, "shared", "personal")  # kept between rounds
TO_ROW = dict(zip(INDIVIDUAL_KEYS, ROW_KEYS, strict=True))
# Optimizer routing: RoW frozen (zero update); A1, B1 and G one group, so one clip norm over all
# trainable arrays as the official HF Trainer computes it.
LABEL_RULE = {k: "frozen" if k in ROW_KEYS else "shared" for k in PLACEMENT}


@struct.dataclass
class ServerState:
    """The server's latest copy of every client's individual LoRA, from which it builds each
    client's RoW."""

    individual: Tree  # {A1, B1} [N]: client i's last upload (zeros until it uploads)
    uploaded: Array  # bool [N]: client i has uploaded at least once


@struct.dataclass
class ClientState:
    """Rows for N clients: what each client keeps between rounds."""

    individual: Tree  # {A1, B1, G} [N]: the client's own LoRA and its mixer
    opt_state: PyTree  # [N]: the optimizer state when optimizer_state = persistent, else {}


def _rename_keys(tree: Tree, mapping: Mapping[str, str]) -> Tree:
    """The same module tree with leaf keys renamed (``A1`` → ``A0``)."""
    if not any(isinstance(v, Mapping) for v in tree.values()):
        return {mapping.get(k, k): v for k, v in tree.items()}
    return {name: _rename_keys(sub, mapping) for name, sub in tree.items()}


def row_weights(uploaded: Array, client_ids: Array) -> Array:
    """[K, N] averaging weights: row k is uniform over the clients j != client_ids[k] with
    ``uploaded[j]``; all zeros when there is no such client."""
    n = uploaded.shape[0]
    others = (jnp.arange(n)[None, :] != client_ids[:, None]) & uploaded[None, :].astype(bool)
    counts = jnp.sum(others, axis=1, keepdims=True)
    return jnp.where(others, 1.0 / jnp.maximum(counts, 1), 0.0).astype(jnp.float32)


def rest_of_world(individual: Tree, uploaded: Array, client_ids: Array) -> Tree:
    """RoW {A0, B0} for each of ``client_ids`` (leading axis K) from the server's copies
    ``individual`` {A1, B1} (leading axis N): leave-one-out, unweighted, A and B separately."""
    w = row_weights(uploaded, client_ids)

    def mix(x: Array) -> Array:
        return jnp.tensordot(w, x.astype(jnp.float32), axes=1).astype(x.dtype)

    return _rename_keys(jax.tree.map(mix, individual), TO_ROW)


@register("fedalt")
def fedalt(training: ClientTraining, options: NoOptions) -> Algorithm:
    """States: ``ServerState`` and ``ClientState``.

    The official optimizer (HF Trainer: fresh AdamW, linear decay, weight decay 0.05, clip 1.0
    over all trainable arrays) is ``training`` with schedule="linear", optimizer_state="fresh";
    the ``fedalt`` presets set it.
    """
    require_kind("fedalt", training, ("mixture",))
    steps = training.local_steps
    loss_fn = make_loss_fn(training)

    def labels(params: Tree) -> Tree:
        return label_tree(params, LABEL_RULE)

    tx = make_optimizer(training, labels, steps)
    persistent = training.optimizer_state == "persistent"

    def init(key: Array, base: PyTree, num_clients: int) -> tuple[ServerState, ClientState]:
        keys = jax.random.split(key, num_clients)
        trees = jax.vmap(lambda k: init_adapters(k, training.model, training.adapter))(keys)
        one = jax.tree.map(lambda x: x[0], trees)
        server = ServerState(
            individual=jax.tree.map(jnp.zeros_like, select_keys(trees, INDIVIDUAL_KEYS)),
            uploaded=jnp.zeros((num_clients,), bool),
        )
        opt_rows = replicate(tx.init(one), num_clients) if persistent else {}
        return server, ClientState(select_keys(trees, PERSONAL_KEYS), opt_rows)

    def broadcast(server: ServerState, client_ids: Array, info: Any) -> Tree:
        return rest_of_world(server.individual, server.uploaded, client_ids)

    def client_update(
        base: PyTree,
        payload: Tree,
        client_state: ClientState,
        batches: Mapping[str, Array],
        key: Array,
        info: Any,
    ) -> tuple[Tree, ClientState, dict[str, Array]]:
        params = merge_trees(payload, client_state.individual)
        opt_state = opt_state_or_init(tx, params, client_state.opt_state if persistent else None)
        params, opt_state, metrics = local_train(
            loss_fn, base, params, tx, opt_state, batches, key, labels
        )
        kept = ClientState(select_keys(params, PERSONAL_KEYS), opt_state if persistent else {})
        return select_keys(params, INDIVIDUAL_KEYS), kept, metrics

    def aggregate(
        server: ServerState, uploads: Tree, weights: Array, client_ids: Array, info: Any
    ) -> ServerState:
        took = weights > 0  # an excluded client's zero-filled row must not replace its copy

        def store(copies: Array, new: Array) -> Array:
            keep = took.reshape((-1,) + (1,) * (new.ndim - 1))
            return copies.at[client_ids].set(jnp.where(keep, new, copies[client_ids]))

        uploaded = server.uploaded.at[client_ids].set(server.uploaded[client_ids] | took)
        return ServerState(jax.tree.map(store, server.individual, uploads), uploaded)

    def models(server: ServerState, client_states: ClientState, info: Any) -> Models:
        n = server.uploaded.shape[0]
        row = rest_of_world(server.individual, server.uploaded, jnp.arange(n))
        return Models(None, merge_trees(row, client_states.individual))

    phase = Phase(
        "train", steps, broadcast, client_update, aggregate, PLACEMENT, per_client_broadcast=True
    )
    return Algorithm("fedalt", init, (phase,), models)
