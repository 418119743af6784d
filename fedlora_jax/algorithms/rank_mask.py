"""Heterogeneous client ranks as data, not shape: every client holds r_max-sized LoRA factors
(r_max = ``adapter.r``) and a rank r_i in its client state; rank components i >= r_i (rows of
A, columns of B) are zero. So one compiled program serves every client (vmap, chunked,
shard_map), and the communication report counts each client at its own rank.

``federated.client_ranks`` (``parse_client_ranks``):

- ``""``: every client at ``adapter.r`` (no masks);
- ``"2,4,8,8"``: one rank per client, in client order (exactly ``data.num_clients`` entries);
- ``"cycle:2,4,8"``: client i gets the (i mod 3)-th rank;
- ``"uniform:2,4,8"``: each client draws one of the listed ranks uniformly (``run.seed``).

Every rank must lie in [1, adapter.r].

``with_client_ranks(algorithm, ranks)`` wraps a FedAvg-family algorithm: the client state gains
the rank; each client receives the broadcast truncated to its rank (the server sends only those
components; its ``client_update`` also finds the rank in the payload as ``"rank"``), trains, and
uploads at its rank (the padded components stay exactly zero: they
get zero gradients, so AdamW and weight decay leave them at 0); its personal model is the
global one truncated to its rank. The client reports ``down_rank/{A,B}`` and ``up_rank/{A,B}``
(the components it received and sent), which ``federated.comm`` counts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedlora_jax.algorithms.base import Algorithm, Models, Phase, replicate
from fedlora_jax.federated.comm import RANK_AXES

PyTree = Any
Array = jax.Array
Tree = dict[str, Any]
Prune = Callable[[Tree, Tree, Array], Array]  # (trained shared, received, rank) -> new rank

SPEC_FORMS = "'' (all at adapter.r), '2,4,8,8' (one per client), 'cycle:2,4,8', 'uniform:2,4,8'"


def parse_client_ranks(spec: str, num_clients: int, r_max: int, seed: int) -> tuple[int, ...]:
    """Client ranks from a ``federated.client_ranks`` spec; () for ``""``. Bad specs raise one
    ValueError line naming the key, the value and the allowed forms."""
    spec = spec.strip()
    if not spec:
        return ()
    where = f"federated.client_ranks={spec!r}"
    form, _, values = spec.rpartition(":")
    try:
        listed = [int(v) for v in values.split(",")]
    except ValueError:
        raise ValueError(f"{where}: not a list of integers; forms: {SPEC_FORMS}") from None
    bad = [r for r in listed if not 1 <= r <= r_max]
    if bad:
        raise ValueError(f"{where}: ranks {bad} are outside [1, adapter.r={r_max}]")
    if form == "":
        if len(listed) != num_clients:
            raise ValueError(
                f"{where}: {len(listed)} ranks for {num_clients} clients (data.num_clients); "
                "give one per client or use 'cycle:' / 'uniform:'"
            )
        return tuple(listed)
    if form == "cycle":
        return tuple(listed[i % len(listed)] for i in range(num_clients))
    if form == "uniform":
        rng = np.random.default_rng(seed)
        return tuple(int(r) for r in rng.choice(listed, size=num_clients))
    raise ValueError(f"{where}: unknown form {form!r}; forms: {SPEC_FORMS}")


def rank_mask(rank: Array, r_max: int) -> Array:
    """[..., r_max] float32: 1 for rank components i < rank, else 0."""
    return (jnp.arange(r_max) < jnp.asarray(rank)[..., None]).astype(jnp.float32)


def truncate(tree: Tree, rank: Array) -> Tree:
    """``tree`` with every A row and B column at index >= ``rank`` set to zero (other arrays,
    e.g. a ``base_delta``, unchanged). ``rank`` is a traced scalar: one program for all ranks."""

    def cut(path, x):
        axis = RANK_AXES.get(getattr(path[-1], "key", None))
        if axis is None:
            return x
        keep = rank_mask(rank, x.shape[axis]).astype(x.dtype)
        return x * (keep[:, None] if axis == 0 else keep[None, :])

    return jax.tree_util.tree_map_with_path(cut, tree)


@struct.dataclass
class RankedClients:
    """The wrapped algorithm's client rows plus each client's rank [N] (int32)."""

    inner: PyTree
    rank: Array


def _rank_metrics(prefix: str, rank: Array, metrics: dict[str, Array]) -> dict[str, Array]:
    """``<prefix>_rank/<factor>``: the client's rank, or 0 where the wrapped method reports
    that it did not send that factor (RoLoRA uploads one of A, B per round)."""
    r = rank.astype(jnp.float32)
    out = {}
    for k in RANK_AXES:
        inner = metrics.get(f"{prefix}_rank/{k}")
        out[f"{prefix}_rank/{k}"] = r if inner is None else jnp.where(inner > 0, r, 0.0)
    return out


def with_client_ranks(
    algorithm: Algorithm,
    ranks: tuple[int, ...],
    *,
    prune: Prune | None = None,
    r_max: int | None = None,
) -> Algorithm:
    """``algorithm`` (FedAvg family: payload ``{"params": ...}``) with per-client ranks; with
    ``ranks`` empty, every client starts at ``r_max``.

    ``prune(trained, received, rank) -> rank`` lets a client lower its rank after training
    (HetLoRA); its upload is truncated to the new rank.
    """

    def init(key: Array, base: PyTree, n: int) -> tuple[PyTree, RankedClients]:
        start = ranks or (r_max,) * n
        if len(start) != n or None in start:
            raise ValueError(f"federated.client_ranks has {len(ranks)} ranks for {n} clients")
        server, clients = algorithm.init(key, base, n)
        return server, RankedClients(clients, jnp.asarray(np.asarray(start, np.int32)))

    def wrap(phase: Phase) -> Phase:
        def client_update(base, payload, state: RankedClients, batches, key, info):
            params = truncate(payload["params"], state.rank)
            mine = {**payload, "params": params, "rank": state.rank}
            upload, inner, metrics = phase.client_update(
                base, mine, state.inner, batches, key, info
            )
            rank = state.rank
            if prune is not None:
                rank = prune(upload, mine["params"], state.rank)
                upload = truncate(upload, rank)
            metrics = {
                **metrics,
                **_rank_metrics("down", state.rank, metrics),
                **_rank_metrics("up", rank, metrics),
            }
            return upload, RankedClients(inner, rank), metrics

        return dataclasses.replace(phase, client_update=client_update)

    def models(server: PyTree, clients: RankedClients, info: Any) -> Models:
        m = algorithm.models(server, clients.inner, info)
        own = m.personal
        if m.personal_is_global:
            own = replicate(m.global_, info.num_clients)
        if own is None:
            return m
        return m.replace(personal=jax.vmap(truncate)(own, clients.rank), personal_is_global=False)

    return dataclasses.replace(
        algorithm, init=init, phases=tuple(wrap(p) for p in algorithm.phases), models=models
    )


@dataclasses.dataclass(frozen=True)
class RankOptions:
    """The option every heterogeneous-rank method takes. The runner fills it from
    ``federated.client_ranks`` (one rank per client, "2,4,8,8"); "" = all at adapter.r."""

    client_ranks: str = ""

    def __post_init__(self) -> None:
        try:
            ranks = [int(r) for r in self.client_ranks.split(",")] if self.client_ranks else []
        except ValueError:
            raise ValueError(
                f"client_ranks={self.client_ranks!r} is not a comma list of integers"
            ) from None
        if any(r < 1 for r in ranks):
            raise ValueError(f"client_ranks={self.client_ranks!r}: every rank must be >= 1")

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(int(r) for r in self.client_ranks.split(",")) if self.client_ranks else ()


def ranked(algorithm: Algorithm, r_max: int, options: RankOptions, **hooks: Any) -> Algorithm:
    """``algorithm`` with the options' client ranks (``with_client_ranks``), or as is without
    ranks and hooks (with a hook, e.g. HetLoRA's ``prune``, every client starts at r_max)."""
    if not options.ranks and not hooks:
        return algorithm
    if options.ranks and max(options.ranks) > r_max:
        raise ValueError(
            f"client_ranks={options.client_ranks!r}: ranks above adapter.r={r_max} "
            "(every client holds adapter.r-sized factors)"
        )
    return with_client_ranks(algorithm, options.ranks, r_max=r_max, **hooks)
