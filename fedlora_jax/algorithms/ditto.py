"""Ditto (Li et al. 2021, "Ditto: fair and robust federated learning through personalization").

Every client keeps a personal model v_k next to the global model w that is trained FedAvg-style.
In a round, client k receives w^t and, on its own data:

    w_k ← w_k − η·∇F_k(w_k)                              (global part, from w^t; uploaded)
    v_k ← v_k − η·(∇F_k(v_k) + λ·(v_k − w^t))            (personal part; kept)

i.e. v_k minimises F_k(v) + λ/2·‖v − w^t‖²; the server averages the w_k (data-weighted, as
FedIT). Uplink and downlink are FedIT's: w only (v never leaves the client).

The step budget is split, not doubled: of the phase's ``local_steps`` client steps (and batches)
the first ``local_steps − personal_steps`` train w and the last ``personal_steps`` train v
(default: half, rounded down, at least 1), so a Ditto client trains as many steps as a FedIT one
(issue 15's common client-step budget). Our choices where the paper is silent: both parts use
the run's client optimizer (clipping, AdamW) on their objective; the proximal anchor is the w^t
received this round (the paper's Algorithm 1); v starts equal to w⁰ (same init key). Placement:
every adapter array is ``shared`` (the global model); the personal copy v is client state.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from fedlora_jax.adapters import init_adapters
from fedlora_jax.algorithms.base import Algorithm, Models, Phase, register, replicate
from fedlora_jax.algorithms.fedavg import ClientState, all_shared, fedavg_family
from fedlora_jax.algorithms.training import (
    ClientTraining,
    local_train,
    make_loss_fn,
    make_optimizer,
    opt_state_or_init,
)


@dataclasses.dataclass(frozen=True)
class DittoOptions:
    lam: float = 0.1  # λ: the pull of the personal model toward the global one
    personal_steps: int | None = None  # client steps on v; None: local_steps // 2 (>= 1)

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError(f"algorithm.options.lam={self.lam} must be >= 0")


@struct.dataclass
class DittoClient:
    """Rows for N clients: the global part's family state and the personal model v."""

    fedavg: ClientState
    personal: dict
    personal_opt: object  # v's optimizer state when optimizer_state = persistent, else {}


def split_steps(local_steps: int, personal_steps: int | None) -> tuple[int, int]:
    """(global, personal) client steps; together they are ``local_steps``."""
    p = max(local_steps // 2, 1) if personal_steps is None else personal_steps
    if local_steps < 2 or not 1 <= p <= local_steps - 1:
        raise ValueError(
            f"algorithm.options.personal_steps={personal_steps} with federated.local_steps="
            f"{local_steps}: ditto splits the client steps between the global and the personal "
            "model, so it needs local_steps >= 2 and 1 <= personal_steps <= local_steps - 1"
        )
    return local_steps - p, p


def proximal_objective(loss_fn, lam: float):
    """F_k(v) + λ/2·‖v − w^t‖² as a loss over (base, v, batch, key) with w^t bound later."""

    def make(anchor):
        def loss(base, params, batch, key):
            value, metrics = loss_fn(base, params, batch, key)
            squares = jax.tree.map(lambda a, b: jnp.sum(jnp.square(a - b)), params, anchor)
            return value + lam / 2 * sum(jax.tree.leaves(squares)), metrics

        return loss

    return make


@register("ditto", DittoOptions)
def ditto(training: ClientTraining, options: DittoOptions) -> Algorithm:
    k_global, k_personal = split_steps(training.local_steps, options.personal_steps)
    placement = all_shared(training)
    family = fedavg_family("ditto", training, placement, steps=k_global)
    inner = family.phases[0]
    tx = make_optimizer(training, lambda p: jax.tree.map(lambda _: "personal", p), k_personal)
    persistent = training.optimizer_state == "persistent"
    objective = proximal_objective(make_loss_fn(training), options.lam)

    def init(key, base, n):
        server, clients = family.init(key, base, n)
        v = init_adapters(key, training.model, training.adapter)  # = w⁰
        opt = replicate(tx.init(v), n) if persistent else {}
        return server, DittoClient(clients, replicate(v, n), opt)

    def client_update(base, payload, state: DittoClient, batches, key, info):
        first = jax.tree.map(lambda x: x[:k_global], batches)
        last = jax.tree.map(lambda x: x[k_global:], batches)
        upload, fam_state, metrics = inner.client_update(
            base, payload, state.fedavg, first, key, info
        )
        anchor = payload["params"]  # w^t
        opt = opt_state_or_init(tx, state.personal, state.personal_opt if persistent else None)
        v, opt, personal = local_train(
            objective(anchor), base, state.personal, tx, opt, last, jax.random.fold_in(key, 1)
        )
        metrics = {**metrics, **{f"personal_{k}": m for k, m in personal.items()}}
        return upload, DittoClient(fam_state, v, opt if persistent else {}), metrics

    def models(server, clients: DittoClient, info):
        return Models(family.models(server, clients.fedavg, info).global_, clients.personal)

    phase = Phase("train", training.local_steps, inner.broadcast, client_update, inner.aggregate,
                  placement)  # fmt: skip
    return Algorithm("ditto", init, (phase,), models)
