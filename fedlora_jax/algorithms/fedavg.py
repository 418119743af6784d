"""The FedAvg family as one builder with hooks (FedIT, FFA-LoRA, FedSA-LoRA, Local-only,
Centralised, FedProx, FedAvgM, FedAdam, ... are configurations of it).

Every round: the server broadcasts its shared (and server-owned) leaves; each client starts from
them plus its personal leaves (frozen leaves are regenerated from the run's init key, so they
are never communicated), trains the shared and personal leaves for its client steps and uploads
the shared ones; the server reduces the uploads to their data-weighted mean.

Hooks:
- ``client_penalty(trained_shared, received_shared) -> scalar`` added to the client loss
  (FedProx's proximal term).
- ``server_optimizer``: an optax transform applied to the mean pseudo-gradient
  ``x − mean_k(x_k)`` (FedAvgM, FedAdam, FedYogi, FedAdagrad are one line each).
- ``transforms``: aggregation transforms (``federated.aggregation.chain``) applied to the stacked
  client updates ``x_k − x`` before ``reduce`` (clipping, robust weighting, DP).
- ``finalize(params, uploads, weights, info) -> params``: a server step after aggregation,
  e.g. folding a residual into a ``server``-placed base delta (FedEx-LoRA).
- ``control_variates``: SCAFFOLD's server variate c and client variates c_i (option II, over the
  shared leaves): clients step on ``g − c_i + c``, then ``c_i⁺ = c_i − c + (x − y) / (E·lr)``
  and upload ``{"params": y, "variate": c_i⁺ − c_i}``; the server adds
  ``Σ_valid (c_i⁺ − c_i) / N`` to c. Both variates are communicated and counted.

With neither a server optimizer nor transforms the new global leaves are the reduced uploads
themselves (the mean of models, bitwise as FedIT always computed it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedlora_jax.adapters import init_adapters
from fedlora_jax.algorithms.base import (
    Algorithm,
    Models,
    Phase,
    keys_placed,
    merge_trees,
    placement_labels,
    replicate,
    select_placed,
)
from fedlora_jax.algorithms.common import raw_key
from fedlora_jax.algorithms.training import (
    ClientTraining,
    local_train,
    make_loss_fn,
    make_optimizer,
    opt_state_or_init,
)
from fedlora_jax.federated.aggregation import (
    AggregationTransform,
    Reducer,
    chain,
    weighted_mean,
)
from fedlora_jax.federated.context import RoundInfo

PyTree = Any
Array = jax.Array
Tree = dict[str, Any]
Penalty = Callable[[Tree, Tree], Array]


@struct.dataclass
class ServerState:
    """params: the global shared and server-owned leaves. init_key: regenerates the frozen
    leaves. opt_state / agg_state: the server optimizer's and aggregation transforms' states
    (empty without them). seen [N]: each client's latest aggregation weight (the weights of the
    evaluation-only global model when personal leaves exist)."""

    params: Tree
    init_key: Array
    opt_state: PyTree
    agg_state: PyTree
    seen: Array
    variate: Tree  # SCAFFOLD's c over the shared leaves ({} without control variates)


@struct.dataclass
class ClientState:
    """Rows for N clients: personal leaves, the optimizer state when persistent, SCAFFOLD's
    c_i with control variates."""

    personal: Tree
    opt_state: PyTree
    variate: Tree


def leaf_keys(training: ClientTraining) -> tuple[str, ...]:
    """The array names of one adapter leaf of this kind (e.g. ``("A", "B")`` for lora)."""
    tree = jax.eval_shape(
        lambda: init_adapters(jax.random.key(0), training.model, training.adapter)
    )
    node = tree
    while not any(hasattr(v, "shape") for v in node.values()):
        node = next(iter(node.values()))
    return tuple(node)


def all_shared(training: ClientTraining) -> dict[str, str]:
    """The placement that trains, uploads and averages every adapter array (FedIT)."""
    return dict.fromkeys(leaf_keys(training), "shared")


def _sub(a: Tree, b: Tree) -> Tree:
    return jax.tree.map(jnp.subtract, a, b)


def fedavg_family(
    name: str,
    training: ClientTraining,
    placement: Mapping[str, str],
    *,
    client_penalty: Penalty | None = None,
    server_optimizer: optax.GradientTransformation | None = None,
    transforms: tuple[AggregationTransform, ...] = (),
    reduce: Reducer = weighted_mean,
    finalize: Callable[[Tree, Tree, Array, RoundInfo], Tree] | None = None,
    init_params: Callable[[Array], Tree] | None = None,
    control_variates: bool = False,
    steps: int | None = None,
    pooled_data: bool = False,
) -> Algorithm:
    """One-phase FedAvg-style algorithm from a placement spec and the hooks above."""
    steps = training.local_steps if steps is None else steps
    shared = keys_placed(placement, "shared")
    personal = keys_placed(placement, "personal")
    frozen = keys_placed(placement, "frozen")
    loss_fn = make_loss_fn(training)
    labels = placement_labels(placement)
    tx = make_optimizer(training, labels, steps)
    persistent = training.optimizer_state == "persistent"
    aggregation = chain(*transforms)
    in_update_space = bool(transforms) or server_optimizer is not None
    make = init_params or (lambda key: init_adapters(key, training.model, training.adapter))

    def trainable(tree: Tree) -> Tree:
        return select_placed(tree, placement, "shared", "personal")

    def fixed_leaves(init_key: Array) -> Tree:
        return select_placed(make(init_key), placement, "frozen") if frozen else {}

    def init(key: Array, base: PyTree, n: int) -> tuple[ServerState, ClientState]:
        adapters = make(key)
        params = select_placed(adapters, placement, "shared", "server")
        global_shared = select_placed(params, placement, "shared")
        opt = server_optimizer.init(global_shared) if server_optimizer else {}
        server = ServerState(
            params=params,
            init_key=raw_key(key),
            opt_state=opt,
            agg_state=aggregation.init(global_shared),
            seen=jnp.zeros((n,), jnp.float32),
            variate=jax.tree.map(jnp.zeros_like, global_shared) if control_variates else {},
        )
        own = replicate(select_placed(adapters, placement, "personal"), n) if personal else {}
        opt_rows = replicate(tx.init(trainable(adapters)), n) if persistent else {}
        variates = replicate(server.variate, n) if control_variates else {}
        return server, ClientState(own, opt_rows, variates)

    def broadcast(server: ServerState, client_ids: Array, info: RoundInfo) -> dict[str, Any]:
        payload: dict[str, Any] = {"params": server.params}
        if frozen:
            payload["init_key"] = server.init_key
        if control_variates:
            payload["variate"] = server.variate
        return payload

    def client_update(base, payload, state: ClientState, batches, key, info):
        const = merge_trees(
            select_placed(payload["params"], placement, "server"),
            fixed_leaves(payload["init_key"]) if frozen else {},
        )
        received = select_placed(payload["params"], placement, "shared")
        start = merge_trees(received, state.personal)

        def loss(base, params, batch, step_key):
            value, metrics = loss_fn(base, merge_trees(params, const), batch, step_key)
            if client_penalty is not None:
                value = value + client_penalty(select_placed(params, placement, "shared"), received)
            return value, metrics

        correct = None
        if control_variates:
            shift = jax.tree.map(jnp.subtract, payload["variate"], state.variate)  # c − c_i

            def correct(grads):
                return merge_trees(
                    jax.tree.map(jnp.add, select_placed(grads, placement, "shared"), shift),
                    select_placed(grads, placement, "personal"),
                )

        opt_state = opt_state_or_init(tx, start, state.opt_state if persistent else None)
        params, opt_state, metrics = local_train(
            loss, base, start, tx, opt_state, batches, key, labels, correct
        )
        upload = select_placed(params, placement, "shared")
        variate = {}
        if control_variates:
            scale = 1.0 / (batches["tokens"].shape[0] * training.lr)
            variate = jax.tree.map(
                lambda ci, c, x, y: ci - c + (x - y) * scale,
                state.variate, payload["variate"], received, upload,
            )  # fmt: skip
            upload = {"params": upload, "variate": _sub(variate, state.variate)}
        new_state = ClientState(
            select_placed(params, placement, "personal") if personal else {},
            opt_state if persistent else {},
            variate,
        )
        return upload, new_state, metrics

    def aggregate(server: ServerState, uploads, weights, client_ids, info) -> ServerState:
        old = select_placed(server.params, placement, "shared")
        opt_state, agg_state, variate = server.opt_state, server.agg_state, server.variate
        if control_variates:
            uploads, dvar = uploads["params"], uploads["variate"]
            took = (weights > 0).astype(jnp.float32)
            variate = jax.tree.map(
                lambda c, d: c + jnp.tensordot(took, d, axes=1) / info.num_clients, variate, dvar
            )
        if not in_update_space:
            new = reduce(uploads, weights, info.key)
        else:
            deltas = jax.vmap(_sub, in_axes=(0, None))(uploads, old)
            deltas, w, agg_state = aggregation.update(deltas, weights, agg_state, info)
            mean_delta = reduce(deltas, w, info.key)
            if server_optimizer is None:
                new = jax.tree.map(jnp.add, old, mean_delta)
            else:
                pseudo_grad = jax.tree.map(jnp.negative, mean_delta)
                updates, opt_state = server_optimizer.update(pseudo_grad, opt_state, old)
                new = optax.apply_updates(old, updates)
        params = merge_trees(new, select_placed(server.params, placement, "server"))
        if finalize is not None:
            params = finalize(params, uploads, weights, info)
        seen = server.seen.at[client_ids].set(
            jnp.where(weights > 0, weights, server.seen[client_ids])
        )
        return server.replace(
            params=params, opt_state=opt_state, agg_state=agg_state, seen=seen, variate=variate
        )

    construct_label = (
        f"global ({' + '.join(shared)} + mean {' + mean '.join(personal)}; evaluation only)"
    )

    def models(server: ServerState, clients: ClientState, info: RoundInfo) -> Models:
        common = merge_trees(server.params, fixed_leaves(server.init_key) if frozen else {})
        if not personal:
            return Models(common, None, personal_is_global=True)
        n = info.num_clients
        own = merge_trees(replicate(common, n), clients.personal)
        if not shared:
            return Models(None, own)
        # An evaluation construct (the protocol never uploads personal leaves): the shared
        # leaves plus the latest-weight mean of the personal ones (uniform before any round).
        w = jnp.where(jnp.sum(server.seen) > 0, server.seen, jnp.ones_like(server.seen))
        mean = merge_trees(common, weighted_mean(clients.personal, w))
        return Models(mean, own, global_label=construct_label)

    def origin(server: ServerState) -> Tree:  # the uploads are the trained shared leaves
        return select_placed(server.params, placement, "shared")

    phase = Phase(
        "train", steps, broadcast, client_update, aggregate if shared else None, dict(placement),
        upload_origin=None if control_variates else origin,  # SCAFFOLD also uploads variates
    )  # fmt: skip
    return Algorithm(name, init, (phase,), models, pooled_data=pooled_data)
