"""FedLoRA-Optimizer (arXiv 2510.11274): a global optimizer for the shared LoRA direction, a local
optimizer for the personal B magnitude.

The adapter kind is ``decomposed``: A = A_M·A_D, B = B_M·B_D (magnitude · unit direction). The
paper's observation (its Fig. 1, ``scripts/sensitivity.py``) is that across tasks A's direction
moves most and B's magnitude moves most, so A_D carries shared knowledge and B_M personal
knowledge. Each round has two phases:

1. ``global``: clients start from the global adapter and train ``global_train`` (default all four
   components) for E_g steps with the global optimizer; the server FedAvgs ``aggregate``
   (default all four: the global model needs a B_M too). Variant ``paper_literal``: only A_D is
   trained and aggregated (needs ``adapter.init="paper_literal"``: with B_M = 0, A_D would get
   no gradient).
2. ``personal``: each client takes the new global adapter with its own B_M (``personal_bm=
   "persistent"``; the global B_M the first time, or always with ``"restart"``) and trains only
   B_M for E_l steps with the local optimizer. Nothing is uploaded. With ``local_phase="final"``
   this phase trains only in the round numbered ``rounds`` (after the last aggregation); in
   earlier rounds it is a no-op (a ``lax.cond`` on the server's round counter, which is shared by
   all clients, so the skipped branch costs nothing) and reports NaN metrics.

Global model = the server adapter. Personal model of client i = global {A_M, A_D, B_D} + B_M_i
(the global B_M for a client that never ran the personal phase).

The two optimizers are one ``optax.partition`` per phase (``federated.local.make_optimizer``):
label ``global`` → AdamW(global_lr, E_g steps), ``local`` → AdamW(local_lr, E_l steps),
``frozen`` → zero update. With ``optimizer_state="persistent"`` each client keeps both phases'
optimizer states across rounds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedlora_jax.adapters import init_adapters
from fedlora_jax.algorithms.base import Algorithm, ClientTraining, Phase, register
from fedlora_jax.algorithms.common import (
    init_client_states,
    label_by_key,
    merge_trees,
    replicate,
    require_kind,
    select_keys,
    train_client,
)
from fedlora_jax.federated.aggregation import fedavg
from fedlora_jax.federated.local import local_train, make_loss_fn, make_optimizer

PyTree = Any
Array = jax.Array

COMPONENTS = ("A_M", "A_D", "B_M", "B_D")
SHARED = ("A_M", "A_D", "B_D")  # what the personal model takes from the global adapter
VARIANTS = {"default": COMPONENTS, "paper_literal": ("A_D",)}  # global-phase train/aggregate set
LOCAL_PHASES = ("every_round", "final")
PERSONAL_BM = ("persistent", "restart")


def _choice(key: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(
            f"algorithm.options.{key}={value!r} is not allowed; allowed: {', '.join(allowed)}"
        )
    return value


def _components(key: str, value: str | Sequence[str] | None, default: Sequence[str]) -> tuple:
    """A component set from a sequence or a comma-separated string, checked and in model order."""
    if value is None:
        return tuple(default)
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    bad = [n for n in names if n not in COMPONENTS]
    if bad or not names:
        raise ValueError(
            f"algorithm.options.{key}={value!r} must be a non-empty subset of "
            f"{', '.join(COMPONENTS)}"
        )
    return tuple(c for c in COMPONENTS if c in names)


def _positive(key: str, value: float | None, default: float, *, integer: bool = False) -> Any:
    """``value`` (``default`` when None), which must be > 0, and an int if ``integer``."""
    if value is None:
        return default
    if (integer and (not isinstance(value, int) or isinstance(value, bool))) or value <= 0:
        kind = "a positive integer" if integer else "> 0"
        raise ValueError(f"algorithm.options.{key}={value!r} must be {kind}")
    return value


def _choose(flag: Array, own: PyTree, shared: PyTree) -> PyTree:
    """``own`` where ``flag`` is set, else ``shared``; ``flag`` [] for one client or [N] for
    stacked rows (``shared`` unstacked, broadcast over the rows)."""

    def pick(o: Array, g: Array) -> Array:
        return jnp.where(flag.reshape(flag.shape + (1,) * (o.ndim - flag.ndim)), o, g)

    return jax.tree.map(pick, own, shared)


class PhaseOptimizers(NamedTuple):
    """The two phases' optax.partition optimizers and their label functions."""

    tx_global: optax.GradientTransformation
    labels_global: Callable[[PyTree], PyTree]
    tx_personal: optax.GradientTransformation
    labels_personal: Callable[[PyTree], PyTree]


def phase_optimizers(
    train_global: ClientTraining, train_local: ClientTraining, trained: Sequence[str]
) -> PhaseOptimizers:
    """Global phase: ``trained`` components → ``global`` (AdamW at train_global.lr over its
    local_steps), the rest frozen. Personal phase: B_M → ``local`` (AdamW at train_local.lr),
    the rest frozen. Both carry all three groups so that their states have one structure."""
    kw = {"local": train_local, "local_steps": train_local.local_steps}
    labels_g = label_by_key({c: "global" if c in trained else "frozen" for c in COMPONENTS})
    labels_l = label_by_key({c: "local" if c == "B_M" else "frozen" for c in COMPONENTS})
    steps = train_global.local_steps
    return PhaseOptimizers(
        make_optimizer(train_global, labels_g, steps, **kw), labels_g,
        make_optimizer(train_global, labels_l, steps, **kw), labels_l,
    )  # fmt: skip


@register("fedlora_optimizer")
def fedlora_optimizer(
    training: ClientTraining,
    *,
    global_steps: int | None = None,
    local_steps_personal: int | None = None,
    global_lr: float | None = None,
    local_lr: float | None = None,
    variant: str = "default",
    global_train: str | Sequence[str] | None = None,
    aggregate: str | Sequence[str] | None = None,
    local_phase: str = "every_round",
    personal_bm: str = "persistent",
    rounds: int | None = None,
) -> Algorithm:
    """server_state {"adapters", "round"}; client_states {"B_M"[N], "has_bm"[N], "rounds"[N],
    "opt_state"? and "local_opt_state"? (persistent optimizer state)}.

    Options: ``global_steps`` E_g (default training.local_steps), ``local_steps_personal`` E_l
    (default training.local_steps), ``global_lr`` / ``local_lr`` (default training.lr),
    ``variant`` default | paper_literal, ``global_train`` / ``aggregate`` (component sets,
    default from the variant), ``local_phase`` every_round | final (``rounds`` required for
    final), ``personal_bm`` persistent | restart.
    """
    require_kind("fedlora_optimizer", training, ("decomposed",))
    _choice("variant", variant, tuple(VARIANTS))
    _choice("local_phase", local_phase, LOCAL_PHASES)
    _choice("personal_bm", personal_bm, PERSONAL_BM)
    if variant == "paper_literal" and training.adapter.init != "paper_literal":
        raise ValueError(
            "algorithm.options.variant='paper_literal' needs adapter.init='paper_literal' "
            "(with B_M = 0 the A_D trained alone would get no gradient)"
        )
    trained = _components("global_train", global_train, VARIANTS[variant])
    aggregated = _components("aggregate", aggregate, VARIANTS[variant])
    if not set(aggregated) <= set(trained):
        raise ValueError(
            f"algorithm.options.aggregate={aggregated} must be a subset of global_train="
            f"{trained} (a frozen component is identical on every client)"
        )
    if local_phase == "final" and (rounds is None or rounds < 1):
        raise ValueError(
            "algorithm.options.rounds must be set to federated.rounds (>= 1) when "
            f"local_phase='final'; got {rounds!r}"
        )
    e_g = _positive("global_steps", global_steps, training.local_steps, integer=True)
    e_l = _positive(
        "local_steps_personal", local_steps_personal, training.local_steps, integer=True
    )
    train_g = dataclasses.replace(
        training, lr=_positive("global_lr", global_lr, training.lr), local_steps=e_g
    )
    train_l = dataclasses.replace(
        training, lr=_positive("local_lr", local_lr, training.lr), local_steps=e_l
    )
    loss_fn = make_loss_fn(training)
    kept = tuple(c for c in COMPONENTS if c not in aggregated)  # server keeps these as they are
    tx_g, labels_g, tx_l, labels_l = phase_optimizers(train_g, train_l, trained)
    persistent = training.optimizer_state == "persistent"

    def init(key, base, num_clients):
        adapters = init_adapters(key, training.model, training.adapter)
        clients = init_client_states(training, tx_g, adapters, num_clients)
        clients["B_M"] = replicate(select_keys(adapters, ("B_M",)), num_clients)
        clients["has_bm"] = jnp.zeros((num_clients,), bool)
        if persistent:
            clients["local_opt_state"] = replicate(tx_l.init(adapters), num_clients)
        return {"adapters": adapters, "round": jnp.zeros((), jnp.int32)}, clients

    # ------------------------------------------------------------------ global phase

    def broadcast_global(server, client_ids):
        return server["adapters"]

    def update_global(base, payload, client_state, batches, key):
        params, client_state, metrics = train_client(
            loss_fn, tx_g, base, payload, client_state, batches, key, labels_g
        )
        return select_keys(params, aggregated), client_state, metrics

    def aggregate_global(server, uploads, weights, client_ids):
        adapters = fedavg(uploads, weights)
        if kept:
            adapters = merge_trees(select_keys(server["adapters"], kept), adapters)
        return {"adapters": adapters, "round": server["round"] + 1}

    # ------------------------------------------------------------------ personal phase

    def broadcast_personal(server, client_ids):
        return server

    def train_personal(base, server, client_state, batches, key):
        start = select_keys(server["adapters"], ("B_M",))
        if personal_bm == "persistent":
            start = _choose(client_state["has_bm"], client_state["B_M"], start)
        params = merge_trees(select_keys(server["adapters"], SHARED), start)
        stored = client_state.get("local_opt_state")
        opt_state = tx_l.init(params) if stored is None else stored
        params, opt_state, metrics = local_train(
            loss_fn, base, params, tx_l, opt_state, batches, key, labels_l
        )
        new_state = {
            **client_state,
            "B_M": select_keys(params, ("B_M",)),
            "has_bm": jnp.ones_like(client_state["has_bm"]),
        }
        if stored is not None:
            new_state["local_opt_state"] = opt_state
        return new_state, metrics

    def update_personal(base, payload, client_state, batches, key):
        operands = (base, payload, client_state, batches, key)
        if local_phase == "every_round":
            new_state, metrics = train_personal(*operands)
        else:

            def skip(base, server, client_state, batches, key):
                shapes = jax.eval_shape(train_personal, *operands)[1]
                return client_state, jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan), shapes)

            new_state, metrics = jax.lax.cond(
                payload["round"] >= rounds, train_personal, skip, *operands
            )
        return {}, new_state, metrics

    # ------------------------------------------------------------------ models

    def models(server, client_states):
        adapters = server["adapters"]
        n = client_states["has_bm"].shape[0]
        own = _choose(
            client_states["has_bm"], client_states["B_M"], select_keys(adapters, ("B_M",))
        )
        return adapters, merge_trees(replicate(select_keys(adapters, SHARED), n), own)

    phases = (
        Phase("global", e_g, broadcast_global, update_global, aggregate_global),
        Phase("personal", e_l, broadcast_personal, update_personal, None),
    )
    return Algorithm("fedlora_optimizer", init, phases, models)
