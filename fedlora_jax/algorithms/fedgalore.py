"""FedGaLore (arXiv 2602.01746, as reconstructed in DESIGN.md): federated GaLore with a shared
second moment.

Clients train full-size updates ΔW of the target matrices (adapter kind ``dense_delta``) with
GaLore-Adam (``fedlora_jax.optim.galore``), starting every round from the global ΔW with a fresh
optimizer: first moment zero, projector P from the SVD of the round's first gradient (computed on
the client, never downloaded), second moment seeded from the server's shared one moved into that
new basis (``optim.ajive.to_basis``). The projector stays fixed for the round and there is no
weight decay, so the round's change ΔW_k = ΔW_k P^T P (right side) has rank r exactly: each
client uploads it as its factors, P and the projected change ΔW_k P^T, plus, unless
``sync="none"``, its projected second moment. The server rebuilds every ΔW_k from its factors,
FedAvgs them and builds the shared second moment (``optim.ajive``): ``ajive`` runs AJIVE on the
clients' moment blocks (Wedin and random-direction bounds), ``subspace`` keeps the directions
joint to the clients' GaLore subspaces by a fixed threshold, ``mean`` keeps all r leading
directions of their union; ``none`` = GaLore + FedAvg. Round 0 has no shared moment yet, so its
clients start Adam cold. The personal model is the global one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedlora_jax.adapters import init_adapters
from fedlora_jax.adapters.base import TARGET_PRESETS, AdapterConfig
from fedlora_jax.algorithms.base import Algorithm, Models, Phase, register, require_kind
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
SYNCS = (*ajive.METHODS, "none")
PLACEMENT = {"dW": "shared"}  # uploaded as the factors of this round's change (plus its moment)


@struct.dataclass
class ServerState:
    """The global ΔW and the shared second moment; with sync="none" the moment's four fields
    are {}. No client axis anywhere: clients keep nothing (a fresh optimizer every round), so
    their states are {}."""

    adapters: PyTree  # {dW} per target: the global ΔW
    basis: PyTree  # per target: the basis the shared moment lives in (projector-shaped)
    nu: PyTree  # per target: the shared second moment (moment-shaped)
    synced: PyTree  # bool []: a shared moment exists (False until the first aggregation)
    joint_rank: PyTree  # int32 [] per target: the directions the sync method kept


@dataclasses.dataclass(frozen=True)
class FedGaLoreOptions:
    """rank: GaLore rank (None = adapter.r); update_proj_gap: projector refresh period (each
    round refreshes at its step 0; it must be >= local_steps so the projector is fixed within a
    round and the upload is exact); galore_scale: GaLore's alpha; sync: ajive | subspace | mean |
    none; threshold: the subspace method's joint threshold on the mean squared cosine;
    signal_rank: AJIVE's signal rank per block (None = rank // 2); ajive_samples,
    wedin_percentile, randdir_percentile: AJIVE's bound samples and percentiles (py_jive's
    defaults); targets: modules trained ("adapter" = adapter.targets)."""

    rank: int | None = None
    update_proj_gap: int = 200
    galore_scale: float = 0.25
    sync: str = "ajive"
    threshold: float = 0.75
    signal_rank: int | None = None
    ajive_samples: int = 1000
    wedin_percentile: float = 5.0
    randdir_percentile: float = 95.0
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
    nus: PyTree,
    projs: PyTree,
    weights: Array,
    method: str,
    threshold: float,
    settings: ajive.AjiveSettings | None = None,
    key: Array | None = None,
) -> tuple[PyTree, PyTree, PyTree]:
    """Per leaf (basis, shared moment, kept directions) from the clients' stacked uploads; each
    leaf draws AJIVE's random bounds from its own fold of ``key``."""
    leaves, treedef = jax.tree.flatten(nus)
    keys = [None if key is None else jax.random.fold_in(key, i) for i in range(len(leaves))]
    out = [
        ajive.shared_second_moment(
            v, p, weights, _side(p, v), method, threshold, settings, leaf_key
        )
        for v, p, leaf_key in zip(leaves, treedef.flatten_up_to(projs), keys, strict=True)
    ]
    return tuple(jax.tree.unflatten(treedef, list(part)) for part in zip(*out, strict=True))


def upload_factors(delta: PyTree, proj: PyTree) -> PyTree:
    """The round's change as its exact rank-r factors: the projected change (right side
    ΔW P^T, m x r; left side P^T ΔW, r x n) and the projector P."""
    low = jax.tree.map(lambda d, p: galore.project(d, p, galore.side_of(d)), delta, proj)
    return {"low": low, "proj": proj}


def rebuild_delta(low: PyTree, proj: PyTree) -> PyTree:
    """ΔW from its factors (any leading axes, e.g. the stacked clients)."""
    return jax.tree.map(lambda lo, p: galore.project_back(lo, p, _side(p, lo)), low, proj)


def _check_options(training: ClientTraining, rank: int, o: FedGaLoreOptions) -> None:
    """Reject bad options with the key name and the allowed values."""
    sync, threshold, targets = o.sync, o.threshold, o.targets
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
    if o.update_proj_gap < training.local_steps:
        raise ValueError(
            f"algorithm.options.update_proj_gap={o.update_proj_gap} must be >= "
            f"training.local_steps={training.local_steps}: the projector must stay fixed within a "
            "round for the round's update to have rank r (it is uploaded as rank-r factors)"
        )
    if training.weight_decay:
        raise ValueError(
            f"training.weight_decay={training.weight_decay} must be 0 for fedgalore: decoupled "
            "decay adds a full-rank multiple of ΔW, so the round's update would not be rank r"
        )
    if sync == "ajive":
        s = rank // 2 if o.signal_rank is None else o.signal_rank
        if not isinstance(s, int) or not 1 <= s <= rank // 2:
            raise ValueError(
                f"algorithm.options.signal_rank={o.signal_rank!r} must be in [1, rank // 2 = "
                f"{rank // 2}] (AJIVE samples directions orthogonal to the signal space); "
                "raise the rank or use sync=subspace|mean|none"
            )
        if o.ajive_samples < 1 or not (
            0 <= o.wedin_percentile <= 100 and 0 <= o.randdir_percentile <= 100
        ):
            raise ValueError(
                "algorithm.options.ajive_samples must be >= 1 and wedin_percentile, "
                "randdir_percentile in [0, 100]"
            )
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
    uplink: with sync on, the factors (projected change + projector) and the projected moment;
    uplink_none: sync="none", the factors only; downlink: with sync on, the global ΔW (full size)
    + server basis + shared moment + the "synced" flag; downlink_none: the global ΔW.
    """
    rank = training.adapter.r if rank is None else rank
    cfg = _adapter_cfg(training, targets)
    params = jax.eval_shape(lambda: init_adapters(jax.random.key(0), training.model, cfg))
    state = jax.eval_shape(make_galore_optimizer(training, rank, 200, 0.25).init, params)
    found = galore.find_state(state)
    delta = tree_nbytes(params)
    factors = tree_nbytes(found.mu) + tree_nbytes(found.proj)  # mu has the projected shape
    return {
        "delta": delta,
        "grad": delta,
        "optimizer": tree_nbytes(state),
        "uplink": factors + tree_nbytes(found.nu),
        "uplink_none": factors,
        "downlink": delta + tree_nbytes(found.proj) + tree_nbytes(found.nu) + 1,
        "downlink_none": delta,
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
    """States: ``ServerState``; client states are {} (a fresh optimizer every round)."""
    o = options
    rank = training.adapter.r if o.rank is None else o.rank
    sync, threshold, targets = o.sync, o.threshold, o.targets
    update_proj_gap, galore_scale = o.update_proj_gap, o.galore_scale
    _check_options(training, rank, o)
    settings = ajive.AjiveSettings(
        rank // 2 if o.signal_rank is None else o.signal_rank,
        o.ajive_samples,
        o.wedin_percentile,
        o.randdir_percentile,
    )
    adapter_cfg = _adapter_cfg(training, targets)
    _check_rank(
        jax.eval_shape(lambda: init_adapters(jax.random.key(0), training.model, adapter_cfg)), rank
    )
    loss_fn = make_loss_fn(training)
    tx = make_galore_optimizer(training, rank, update_proj_gap, galore_scale)
    synced = sync != "none"

    def init(key, base, num_clients) -> tuple[ServerState, dict]:
        adapters = init_adapters(key, training.model, adapter_cfg)
        if not synced:
            return ServerState(adapters, {}, {}, {}, {}), {}
        fresh = galore.find_state(tx.init(adapters))
        kept = jax.tree.map(lambda _: jnp.zeros([], jnp.int32), adapters)
        return ServerState(adapters, fresh.proj, fresh.nu, jnp.zeros([], bool), kept), {}

    def broadcast(server: ServerState, client_ids, info) -> dict[str, PyTree]:
        payload = {"adapters": server.adapters}
        if synced:
            payload.update(basis=server.basis, nu=server.nu, synced=server.synced)
        return payload

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
        delta = jax.tree.map(jnp.subtract, new, params)
        upload = upload_factors(delta, galore.projectors(opt_state))
        if synced:
            upload["nu"] = galore.second_moment(opt_state)
        return upload, client_state, metrics

    def aggregate(server: ServerState, uploads, weights, client_ids, info) -> ServerState:
        mean_delta = fedavg(rebuild_delta(uploads["low"], uploads["proj"]), weights)
        out = server.replace(adapters=jax.tree.map(jnp.add, server.adapters, mean_delta))
        if synced:
            basis, shared, kept = shared_second_moment(
                uploads["nu"], uploads["proj"], weights, sync, threshold, settings, info.key
            )
            out = out.replace(basis=basis, nu=shared, synced=jnp.ones([], bool), joint_rank=kept)
        return out

    def models(server: ServerState, client_states: dict, info) -> Models:
        return Models(server.adapters, None, personal_is_global=True)

    phase = Phase("train", training.local_steps, broadcast, client_update, aggregate, PLACEMENT)
    return Algorithm("fedgalore", init, (phase,), models)
