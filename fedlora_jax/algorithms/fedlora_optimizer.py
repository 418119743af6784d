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
   B_M for E_l steps with the personal optimizer. Nothing is uploaded. With
   ``local_phase="final"`` this phase trains only in the last round (``RoundInfo.is_last``, after
   the last aggregation); in earlier rounds it is a no-op (a ``lax.cond`` on the round, which is
   shared by all clients, so the skipped branch costs nothing) and reports NaN metrics.

Global model = the server adapter. Personal model of client i = global {A_M, A_D, B_D} + B_M_i
(the global B_M for a client that never ran the personal phase).

The two optimizers are one ``optax.partition`` per phase (``training.make_optimizer``), labelled
from each phase's placement: ``shared`` → AdamW(global_lr, E_g steps), ``personal`` →
AdamW(local_lr, E_l steps), ``frozen`` → zero update. With ``optimizer_state="persistent"``
each client keeps both phases' optimizer states across rounds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedlora_jax.adapters import init_adapters
from fedlora_jax.algorithms.base import (
    Algorithm,
    Models,
    Phase,
    merge_trees,
    placement_labels,
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
from fedlora_jax.federated.aggregation import fedavg

PyTree = Any
Array = jax.Array
Tree = dict[str, Any]

COMPONENTS = ("A_M", "A_D", "B_M", "B_D")
SHARED = ("A_M", "A_D", "B_D")  # what the personal model takes from the global adapter
VARIANTS = {"default": COMPONENTS, "paper_literal": ("A_D",)}  # global-phase train/aggregate set
LOCAL_PHASES = ("every_round", "final")
PERSONAL_BM = ("persistent", "restart")
PERSONAL_PLACEMENT = {c: "personal" if c == "B_M" else "frozen" for c in COMPONENTS}


def _choice(key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(
            f"algorithm.options.{key}={value!r} is not allowed; allowed: {', '.join(allowed)}"
        )


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


def _positive(key: str, value: float | None) -> None:
    if value is not None and value <= 0:
        kind = "a positive integer" if isinstance(value, int) else "> 0"
        raise ValueError(f"algorithm.options.{key}={value!r} must be {kind}")


@dataclasses.dataclass(frozen=True)
class FedLoRAOptimizerOptions:
    """E_g / E_l default to training.local_steps, the lrs to training.lr; ``global_train`` and
    ``aggregate`` are component sets (comma-separated), default from the variant."""

    global_steps: int | None = None  # E_g
    local_steps_personal: int | None = None  # E_l
    global_lr: float | None = None
    local_lr: float | None = None
    variant: str = "default"  # default | paper_literal
    global_train: str | tuple[str, ...] | None = None
    aggregate: str | tuple[str, ...] | None = None
    local_phase: str = "every_round"  # every_round | final (only in the last round)
    personal_bm: str = "persistent"  # persistent | restart

    def __post_init__(self) -> None:
        _choice("variant", self.variant, tuple(VARIANTS))
        _choice("local_phase", self.local_phase, LOCAL_PHASES)
        _choice("personal_bm", self.personal_bm, PERSONAL_BM)
        for key in ("global_steps", "local_steps_personal", "global_lr", "local_lr"):
            _positive(key, getattr(self, key))
        trained, aggregated = self.trained(), self.aggregated()
        if not set(aggregated) <= set(trained):
            raise ValueError(
                f"algorithm.options.aggregate={aggregated} must be a subset of global_train="
                f"{trained} (a frozen component is identical on every client)"
            )

    @property
    def reads_run_length(self) -> bool:
        """``local_phase="final"`` trains the personal phase only in the last round."""
        return self.local_phase == "final"

    def trained(self) -> tuple[str, ...]:
        return _components("global_train", self.global_train, VARIANTS[self.variant])

    def aggregated(self) -> tuple[str, ...]:
        return _components("aggregate", self.aggregate, VARIANTS[self.variant])


def _choose(flag: Array, own: PyTree, shared: PyTree) -> PyTree:
    """``own`` where ``flag`` is set, else ``shared``; ``flag`` [] for one client or [N] for
    stacked rows (``shared`` unstacked, broadcast over the rows)."""

    def pick(o: Array, g: Array) -> Array:
        return jnp.where(flag.reshape(flag.shape + (1,) * (o.ndim - flag.ndim)), o, g)

    return jax.tree.map(pick, own, shared)


@struct.dataclass
class ServerState:
    """The global adapter; the personal phase's payload is this state as it is."""

    adapters: Tree  # {A_M, A_D, B_M, B_D} per module (no client axis)


@struct.dataclass
class ClientState:
    """Rows for N clients: the personal B_M and, when optimizer_state = persistent, both
    phases' optimizer states (else {})."""

    B_M: Tree  # {B_M} [N]: the client's own B_M (the initial one until it trains it)
    has_bm: Array  # bool [N]: the client has run the personal phase (else B_M is the global one)
    global_opt_state: PyTree  # [N]: the global phase's optimizer state, or {}
    personal_opt_state: PyTree  # [N]: the personal phase's optimizer state, or {}

    # The keys of the dict that held this state before it was typed (checkpoint.dict_layout).
    dict_keys: ClassVar[dict[str, str]] = {
        "global_opt_state": "opt_state", "personal_opt_state": "local_opt_state",
    }  # fmt: skip


class PhaseOptimizers(NamedTuple):
    """The two phases' optax.partition optimizers and their label functions."""

    tx_global: optax.GradientTransformation
    labels_global: Any
    tx_personal: optax.GradientTransformation
    labels_personal: Any


def phase_optimizers(
    train_global: ClientTraining, train_local: ClientTraining, trained: Sequence[str]
) -> PhaseOptimizers:
    """Labels from each phase's placement. Global phase: ``trained`` components → ``shared``
    (AdamW at train_global.lr over its local_steps), the rest frozen. Personal phase: B_M →
    ``personal`` (AdamW at train_local.lr), the rest frozen. Both carry all three groups so that
    their states have one structure."""
    kw = {"personal": train_local, "personal_steps": train_local.local_steps}
    labels_g = placement_labels(global_placement(trained))
    labels_l = placement_labels(PERSONAL_PLACEMENT)
    steps = train_global.local_steps
    return PhaseOptimizers(
        make_optimizer(train_global, labels_g, steps, **kw), labels_g,
        make_optimizer(train_global, labels_l, steps, **kw), labels_l,
    )  # fmt: skip


def global_placement(trained: Sequence[str]) -> dict[str, str]:
    return {c: "shared" if c in trained else "frozen" for c in COMPONENTS}


@register("fedlora_optimizer", FedLoRAOptimizerOptions)
def fedlora_optimizer(training: ClientTraining, options: FedLoRAOptimizerOptions) -> Algorithm:
    """States: ``ServerState`` and ``ClientState``."""
    require_kind("fedlora_optimizer", training, ("decomposed",))
    o = options
    if o.variant == "paper_literal" and training.adapter.init != "paper_literal":
        raise ValueError(
            "algorithm.options.variant='paper_literal' needs adapter.init='paper_literal' "
            "(with B_M = 0 the A_D trained alone would get no gradient)"
        )
    trained, aggregated = o.trained(), o.aggregated()
    e_g = o.global_steps or training.local_steps
    e_l = o.local_steps_personal or training.local_steps
    train_g = dataclasses.replace(training, lr=o.global_lr or training.lr, local_steps=e_g)
    train_l = dataclasses.replace(training, lr=o.local_lr or training.lr, local_steps=e_l)
    loss_fn = make_loss_fn(training)
    kept = tuple(c for c in COMPONENTS if c not in aggregated)  # server keeps these as they are
    tx_g, labels_g, tx_l, labels_l = phase_optimizers(train_g, train_l, trained)
    persistent = training.optimizer_state == "persistent"

    def rows(tx: optax.GradientTransformation, adapters: Tree, n: int) -> PyTree:
        return replicate(tx.init(adapters), n) if persistent else {}

    def init(key, base, num_clients) -> tuple[ServerState, ClientState]:
        adapters = init_adapters(key, training.model, training.adapter)
        clients = ClientState(
            B_M=replicate(select_keys(adapters, ("B_M",)), num_clients),
            has_bm=jnp.zeros((num_clients,), bool),
            global_opt_state=rows(tx_g, adapters, num_clients),
            personal_opt_state=rows(tx_l, adapters, num_clients),
        )
        return ServerState(adapters), clients

    def train(tx, labels, base, params, stored, batches, key):
        """``local_train`` from the stored optimizer state when persistent (fresh otherwise);
        returns the trained params, the optimizer state to keep ({} when fresh), metrics."""
        opt_state = opt_state_or_init(tx, params, stored if persistent else None)
        params, opt_state, metrics = local_train(
            loss_fn, base, params, tx, opt_state, batches, key, labels
        )
        return params, opt_state if persistent else {}, metrics

    # ------------------------------------------------------------------ global phase

    def broadcast_global(server: ServerState, client_ids, info) -> Tree:
        return server.adapters

    def update_global(base, payload, client_state: ClientState, batches, key, info):
        params, opt_state, metrics = train(
            tx_g, labels_g, base, payload, client_state.global_opt_state, batches, key
        )
        new_state = client_state.replace(global_opt_state=opt_state)
        return select_keys(params, aggregated), new_state, metrics

    def aggregate_global(server: ServerState, uploads, weights, client_ids, info) -> ServerState:
        adapters = fedavg(uploads, weights)
        if kept:
            adapters = merge_trees(select_keys(server.adapters, kept), adapters)
        return ServerState(adapters)

    # ------------------------------------------------------------------ personal phase

    def broadcast_personal(server: ServerState, client_ids, info) -> ServerState:
        return server

    def train_personal(base, server: ServerState, client_state: ClientState, batches, key):
        start = select_keys(server.adapters, ("B_M",))
        if o.personal_bm == "persistent":
            start = _choose(client_state.has_bm, client_state.B_M, start)
        params = merge_trees(select_keys(server.adapters, SHARED), start)
        params, opt_state, metrics = train(
            tx_l, labels_l, base, params, client_state.personal_opt_state, batches, key
        )
        new_state = client_state.replace(
            B_M=select_keys(params, ("B_M",)),
            has_bm=jnp.ones_like(client_state.has_bm),
            personal_opt_state=opt_state,
        )
        return new_state, metrics

    def update_personal(base, payload, client_state, batches, key, info):
        operands = (base, payload, client_state, batches, key)
        if o.local_phase == "every_round":
            new_state, metrics = train_personal(*operands)
        else:

            def skip(base, server, client_state, batches, key):
                shapes = jax.eval_shape(train_personal, *operands)[1]
                return client_state, jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan), shapes)

            new_state, metrics = jax.lax.cond(info.is_last, train_personal, skip, *operands)
        return {}, new_state, metrics

    # ------------------------------------------------------------------ models

    def models(server: ServerState, client_states: ClientState, info) -> Models:
        adapters = server.adapters
        own = _choose(client_states.has_bm, client_states.B_M, select_keys(adapters, ("B_M",)))
        n = info.num_clients
        return Models(adapters, merge_trees(replicate(select_keys(adapters, SHARED), n), own))

    phases = (
        Phase(
            "global",
            e_g,
            broadcast_global,
            update_global,
            aggregate_global,
            global_placement(trained),
            payload_held=True,  # = the personal phase's payload of the previous round
            upload_origin=lambda server: select_keys(server.adapters, aggregated),
        ),  # fmt: skip
        Phase(
            "personal",
            e_l,
            broadcast_personal,
            update_personal,
            None,
            PERSONAL_PLACEMENT,
            last_round_only=o.local_phase == "final",
        ),  # fmt: skip
    )
    return Algorithm("fedlora_optimizer", init, phases, models)
