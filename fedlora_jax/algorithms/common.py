"""Helpers shared by the algorithms: adapter-tree surgery by leaf key, client-state plumbing.

Adapter trees are ``{"layers": {"3": {"attn": {"q_proj": {"A": ..., "B": ...}}}}}``; the
functions here split a tree by leaf key (``select_keys(tree, ("A",))``) and merge the parts back,
so an algorithm can send A and keep B without knowing the target modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedlora_jax.algorithms.base import ClientTraining
from fedlora_jax.federated.local import LossFn, local_train, opt_state_or_init

PyTree = Any
Array = jax.Array
Tree = dict[str, Any]
Batch = Mapping[str, Array]  # one client's batches, leaves [steps, batch, seq]


def _is_leaf(node: Any) -> bool:
    return (
        isinstance(node, Mapping)
        and bool(node)
        and not any(isinstance(v, Mapping) for v in node.values())
    )


def select_keys(tree: Tree, keys: Iterable[str]) -> Tree:
    """The same module tree with each leaf cut down to ``keys`` (e.g. only ``B``)."""
    keep = tuple(keys)
    if _is_leaf(tree):
        return {k: tree[k] for k in keep}
    return {name: select_keys(sub, keep) for name, sub in tree.items()}


def merge_trees(*trees: Tree) -> Tree:
    """Deep union of module trees whose leaves hold disjoint keys (inverse of select_keys)."""
    out: dict[str, Any] = {}
    for tree in trees:
        for name, sub in tree.items():
            if name in out and isinstance(sub, Mapping) and not _is_leaf(sub):
                out[name] = merge_trees(out[name], sub)
            elif name in out and _is_leaf(sub):
                out[name] = {**out[name], **sub}
            else:
                out[name] = sub
    return out


def replicate(tree: PyTree, n: int) -> PyTree:
    """Stack ``n`` copies on a new leading axis (one row per client)."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), tree)


def raw_key(key: Array) -> Array:
    """A uint32 key (typed keys converted) so it can live in a checkpointed state."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def require_kind(algorithm: str, training: ClientTraining, allowed: tuple[str, ...]) -> None:
    if training.adapter.kind not in allowed:
        raise ValueError(
            f"adapter.kind={training.adapter.kind!r} is not supported by {algorithm}; "
            f"allowed: {', '.join(allowed)}"
        )


def init_client_states(
    training: ClientTraining, tx: optax.GradientTransformation, params: Tree, n: int
) -> dict[str, Any]:
    """Rows for N clients: a participation counter and, when persistent, the optimizer state."""
    states: dict[str, Any] = {"rounds": jnp.zeros((n,), jnp.int32)}
    if training.optimizer_state == "persistent":
        states["opt_state"] = replicate(tx.init(params), n)
    return states


def train_client(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    base: PyTree,
    params: Tree,
    client_state: dict[str, Any],
    batches: Mapping[str, Array],
    key: Array,
    labels: Callable[[Tree], Tree],
) -> tuple[Tree, dict[str, Any], dict[str, Array]]:
    """``local_train`` with the client's own optimizer state if persistent (fresh otherwise);
    returns the trained params, the updated client-state row and the metrics."""
    opt_state = opt_state_or_init(tx, params, client_state.get("opt_state"))
    params, opt_state, metrics = local_train(
        loss_fn, base, params, tx, opt_state, batches, key, labels
    )
    new_state = {**client_state, "rounds": client_state["rounds"] + 1}
    if "opt_state" in client_state:
        new_state["opt_state"] = opt_state
    return params, new_state, metrics


def label_all(label: str) -> Callable[[Tree], Tree]:
    """A label function giving every adapter array the same label."""
    return lambda params: jax.tree.map(lambda _: label, params)


def label_by_key(rule: Mapping[str, str]) -> Callable[[Tree], Tree]:
    """A label function from leaf key to label, e.g. ``{"A": "frozen", "B": "global"}``."""
    from fedlora_jax.adapters import label_tree

    return lambda params: label_tree(params, rule)
