"""The algorithm API: a federated method is a small frozen dataclass of pure functions.

The engine stacks the sampled clients on a leading axis and runs each phase's ``client_update``
for all of them in one jitted call (vmap / chunked lax.map / shard_map). Every function here is
pure over pytrees, so ``aggregate`` can be called and unit-tested on its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from fedlora_jax.adapters.base import AdapterConfig
from fedlora_jax.model.config import LlamaConfig

PyTree = Any
Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ClientTraining:
    """What every algorithm needs to train a client; algorithm-specific knobs are builder kwargs."""

    model: LlamaConfig
    adapter: AdapterConfig
    local_steps: int = 10
    lr: float = 3e-4
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | linear (decay to 0 over the phase's steps) | cosine
    warmup_steps: int = 0
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    optimizer_state: str = "fresh"  # fresh (new AdamW each round) | persistent (kept per client)
    compute_dtype: str = "float32"  # float32 | bfloat16
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class Phase:
    """One broadcast -> local training -> (optional) aggregation step of a round.

    broadcast(server_state, client_ids[K]) -> payload. With ``per_client_broadcast`` the payload
        has a leading axis K (e.g. FedALT's RoW differs per client); otherwise it is shared.
    client_update(base, payload, client_state, batches, key) -> (upload, client_state, metrics)
        for ONE client (the engine vmaps it). ``batches`` leaves are [steps, batch, seq].
        ``metrics`` is a flat dict of scalars (at least "loss").
    aggregate(server_state, uploads, weights, client_ids) -> server_state, or None (no
        aggregation, e.g. FedLoRA-Optimizer's local phase). ``uploads`` leaves have a leading axis
        K; ``weights`` [K] are data sizes, 0 for a client excluded this round (its upload is
        zero-filled by the engine and must not change the server state).
    """

    name: str
    steps: int
    broadcast: Callable[[PyTree, Array], PyTree]
    client_update: Callable[[PyTree, PyTree, PyTree, dict[str, Array], Array], tuple]
    aggregate: Callable[[PyTree, PyTree, Array, Array], PyTree] | None
    per_client_broadcast: bool = False


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """init(key, base, num_clients) -> (server_state, client_states with leading axis N).

    models(server_state, client_states) -> (global_adapters | None, personal_adapters | None);
    personal adapters carry a leading axis N (one per client).
    """

    name: str
    init: Callable[[Array, PyTree, int], tuple[PyTree, PyTree]]
    phases: tuple[Phase, ...]
    models: Callable[[PyTree, PyTree], tuple[PyTree | None, PyTree | None]]
    pooled_data: bool = False  # Centralised: the engine trains one "client" on the union


Builder = Callable[..., Algorithm]  # builder(training: ClientTraining, **options) -> Algorithm
_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        _REGISTRY[name] = fn
        return fn

    return deco


def get(name: str) -> Builder:
    """The builder registered under ``name``: ``get("fedit")(training, **options)``."""
    from fedlora_jax import algorithms as _pkg  # noqa: F401  (imports register the built-ins)

    if name not in _REGISTRY:
        raise ValueError(
            f"algorithm.name={name!r} is not known; allowed: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def names() -> list[str]:
    from fedlora_jax import algorithms as _pkg  # noqa: F401

    return sorted(_REGISTRY)
