"""FedGaLore (arXiv 2602.01746, as reconstructed in DESIGN.md): federated GaLore with a shared
second moment.

Clients train full-size updates ΔW of the target matrices (adapter kind ``dense_delta``) with
GaLore-Adam (``fedlora_jax.optim.galore``), starting every round from the global ΔW with a fresh
optimizer: first moment zero, projector from the SVD of the round's first gradient, second moment
seeded from the server's shared one moved into that new basis (``optim.ajive.to_basis``). They
upload their change this round plus, unless ``sync="none"``, their projected second moment and
projector. The server FedAvgs the changes and builds the shared second moment in a rank-r basis
of its own (``optim.ajive``): ``ajive`` keeps only the directions joint to the clients' GaLore
subspaces, ``mean`` the r leading directions of their union; ``none`` = GaLore + FedAvg. Round 0
has no shared moment yet, so its clients start Adam cold. The personal model is the global one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedlora_jax.adapters import init_adapters
from fedlora_jax.adapters.base import TARGET_PRESETS, AdapterConfig
from fedlora_jax.algorithms.base import Algorithm, Models, Phase, register, require_kind
from fedlora_jax.algorithms.common import init_client_states
from fedlora_jax.algorithms.training import (
    ClientTraining,
    local_train,
    make_loss_fn,
    make_schedule,
)
from fedlora_jax.federated.aggregation import fedavg
from fedlora_jax.federated.comm import tree_nbytes
from fedlora_jax.optim import ajive, galore

PyTree = Any
Array = jax.Array
SYNCS = ("ajive", "mean", "none")
PLACEMENT = {"dW": "shared"}  # uploaded as this round's change of dW (plus its moment)


@dataclasses.dataclass(frozen=True)
class FedGaLoreOptions:
    """rank: GaLore rank (None = adapter.r); update_proj_gap: projector refresh period within a
    round (each round refreshes at its step 0); galore_scale: GaLore's alpha; sync: ajive | mean |
    none; threshold: AJIVE joint threshold on the mean squared cosine; targets: modules trained
    ("adapter" = adapter.targets)."""

    rank: int | None = None
    update_proj_gap: int = 200
    galore_scale: float = 0.25
    sync: str = "ajive"
    threshold: float = 0.75
    targets: str = "attn"


def make_galore_optimizer(
    training: ClientTraining, rank: int, update_proj_gap: int, scale: float
) -> optax.GradientTransformation:
    """Global-norm clipping (full gradient) then GaLore-AdamW on the phase's lr schedule."""
    parts = [optax.clip_by_global_norm(training.grad_clip)] if training.grad_clip > 0 else []
    parts.append(
        galore.galore_adamw(
            make_schedule(training, training.local_steps),
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            weight_decay=training.weight_decay,
        )
    )
    return optax.chain(*parts)


def seed_second_moment(basis: PyTree, shared: PyTree, proj: PyTree) -> PyTree:
    """The server's shared moment (in its basis) moved into each leaf's new projector basis."""

    def one(b: Array, v: Array, p: Array) -> Array:
        return ajive.to_basis(v, b, p, _side(p, v))

    return jax.tree.map(one, basis, shared, proj)


def _side(proj: Array, nu: Array) -> galore.Side:
    """Right-side projectors are r x n with nu m x r; left ones m x r with nu r x n."""
    return "right" if proj.shape[-2] == nu.shape[-1] else "left"


def shared_second_moment(
    nus: PyTree, projs: PyTree, weights: Array, method: str, threshold: float
) -> tuple[PyTree, PyTree, PyTree]:
    """Per leaf (basis, shared moment, kept directions) from the clients' stacked uploads."""
    out = jax.tree.map(
        lambda v, p: ajive.shared_second_moment(v, p, weights, _side(p, v), method, threshold),
        nus,
        projs,
    )
    outer, inner = jax.tree.structure(nus), jax.tree.structure((0, 0, 0))
    return jax.tree.transpose(outer, inner, out)


def _check_options(
    training: ClientTraining, rank: int, sync: str, threshold: float, targets: str
) -> None:
    """Reject bad options with the key name and the allowed values."""
    require_kind("fedgalore", training, ("dense_delta",))
    if training.optimizer_state != "fresh":
        raise ValueError(
            "fedgalore starts a fresh GaLore optimizer every round (its second moment comes from "
            f"the server); training.optimizer_state={training.optimizer_state!r}, allowed: fresh"
        )
    if sync not in SYNCS:
        raise ValueError(
            f"algorithm.options.sync={sync!r} is not allowed; allowed: {', '.join(SYNCS)}"
        )
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"algorithm.options.rank={rank!r} must be a positive int")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"algorithm.options.threshold={threshold!r} must be in (0, 1]")
    if not targets:
        raise ValueError(
            "algorithm.options.targets must be 'adapter' (use adapter.targets), a preset "
            f"({', '.join(TARGET_PRESETS)}) or a regex"
        )


def _adapter_cfg(training: ClientTraining, targets: str) -> AdapterConfig:
    if targets == "adapter":
        return training.adapter
    return dataclasses.replace(training.adapter, targets=targets)


def footprint(
    training: ClientTraining, rank: int | None = None, targets: str = "attn"
) -> dict[str, int]:
    """Bytes one client holds and exchanges per round, from shapes only (nothing allocated).

    delta and grad: full-size ΔW of the targets; optimizer: the clip + GaLore-AdamW state;
    uplink / downlink: with sync on (ΔW + moment + projector; ΔW + server basis + moment + flag);
    uplink_none: sync="none".
    """
    rank = training.adapter.r if rank is None else rank
    cfg = _adapter_cfg(training, targets)
    params = jax.eval_shape(lambda: init_adapters(jax.random.key(0), training.model, cfg))
    state = jax.eval_shape(make_galore_optimizer(training, rank, 200, 0.25).init, params)
    found = galore.find_state(state)
    delta = tree_nbytes(params)
    synced = delta + tree_nbytes(found.nu) + tree_nbytes(found.proj)
    return {
        "delta": delta,
        "grad": delta,
        "optimizer": tree_nbytes(state),
        "uplink": synced,
        "uplink_none": delta,
        "downlink": synced + 1,
    }


def _check_rank(adapters: PyTree, rank: int) -> None:
    smallest = min(min(x.shape[-2:]) for x in jax.tree.leaves(adapters))
    if rank >= smallest:
        raise ValueError(
            f"algorithm.options.rank={rank} must be smaller than the smallest side of every "
            f"target matrix ({smallest}); lower the rank or change the targets"
        )


@register("fedgalore", FedGaLoreOptions)
def fedgalore(training: ClientTraining, options: FedGaLoreOptions) -> Algorithm:
    """server_state {"adapters", and unless sync=none "basis" and "nu" (projector- and moment-shaped
    per target), "synced", "joint_rank"}; client_states {} (a fresh optimizer every round).
    """
    o = options
    rank = training.adapter.r if o.rank is None else o.rank
    sync, threshold, targets = o.sync, o.threshold, o.targets
    update_proj_gap, galore_scale = o.update_proj_gap, o.galore_scale
    _check_options(training, rank, sync, threshold, targets)
    adapter_cfg = _adapter_cfg(training, targets)
    _check_rank(
        jax.eval_shape(lambda: init_adapters(jax.random.key(0), training.model, adapter_cfg)), rank
    )
    loss_fn = make_loss_fn(training)
    tx = make_galore_optimizer(training, rank, update_proj_gap, galore_scale)
    synced = sync != "none"

    def init(key, base, num_clients):
        adapters = init_adapters(key, training.model, adapter_cfg)
        server: dict[str, Any] = {"adapters": adapters}
        if synced:
            fresh = galore.find_state(tx.init(adapters))
            server["basis"], server["nu"] = fresh.proj, fresh.nu
            server["synced"] = jnp.zeros([], bool)
            server["joint_rank"] = jax.tree.map(lambda _: jnp.zeros([], jnp.int32), adapters)
        return server, init_client_states(training, tx, adapters, num_clients)

    def broadcast(server, client_ids, info):
        return {k: server[k] for k in ("adapters", "basis", "nu", "synced") if k in server}

    def client_update(base, payload, client_state, batches, key, info):
        params = payload["adapters"]
        opt_state = tx.init(params)
        if synced:
            # Peel the projector of step 0 so the shared moment can be mapped into it first.
            first = jax.tree.map(lambda x: x[0], batches)
            grads = jax.grad(lambda p: loss_fn(base, p, first, jax.random.fold_in(key, 0))[0])(
                params
            )
            opt_state = galore.refresh_projectors(opt_state, grads)
            seed = seed_second_moment(payload["basis"], payload["nu"], galore.projectors(opt_state))
            seed = jax.tree.map(lambda v: jnp.where(payload["synced"], v, 0.0), seed)
            opt_state = galore.set_second_moment(opt_state, seed)
        new, opt_state, metrics = local_train(loss_fn, base, params, tx, opt_state, batches, key)
        upload: dict[str, PyTree] = {"delta": jax.tree.map(jnp.subtract, new, params)}
        if synced:
            upload["nu"] = galore.second_moment(opt_state)
            upload["proj"] = galore.projectors(opt_state)
        return upload, client_state, metrics

    def aggregate(server, uploads, weights, client_ids, info):
        mean_delta = fedavg(uploads["delta"], weights)
        out = {"adapters": jax.tree.map(jnp.add, server["adapters"], mean_delta)}
        if synced:
            basis, shared, kept = shared_second_moment(
                uploads["nu"], uploads["proj"], weights, sync, threshold
            )
            out.update(basis=basis, nu=shared, synced=jnp.ones([], bool), joint_rank=kept)
        return out

    def models(server, client_states, info):
        return Models(server["adapters"], None, personal_is_global=True)

    phase = Phase("train", training.local_steps, broadcast, client_update, aggregate, PLACEMENT)
    return Algorithm("fedgalore", init, (phase,), models)
