"""The round loop: sample → per phase (broadcast → all sampled clients in one jitted call →
aggregate) → scatter client states back.

One jitted function per (phase, backend) does the whole phase on device: gather the sampled
clients' rows of the N-stacked client state, run ``client_update`` for all of them (vmap, chunked
``lax.map`` or ``shard_map`` over a ``clients`` mesh axis), exclude clients whose upload or new
state is non-finite and the padding clients that make K divide over the clients axis
(``pad_ids``), aggregate, and scatter. The compiled functions are cached per (algorithm
name, options, training) and phase, so the round loop traces each phase once per shape. The
``debug`` backend runs the same phase without jit, one client at a time, and names the client
and round of an error: for people writing a new method.

Client c's key in round r, phase p is ``fold_in(fold_in(fold_in(state.rng, r), p), c)``: results
do not depend on the backend or on which other clients were sampled. The server's key for the
phase (``RoundInfo.key``) is ``fold_in(phase key, SERVER_KEY)``.

The engine is typed against the small Protocols below; ``algorithms.base`` implements them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from fedlora_jax.federated import distributed
from fedlora_jax.federated.comm import first_download_share, phase_bytes
from fedlora_jax.federated.context import RoundInfo
from fedlora_jax.federated.sampling import poisson_sample, sample_clients
from fedlora_jax.host_memory import compiles, release_free_heap
from fedlora_jax.settings import ConfigError, Section, setting

PyTree = Any
Array = jax.Array

log = logging.getLogger(__name__)

BACKENDS = ("vmap", "chunked", "shard_map", "mesh", "debug")
MESH_AXIS = "clients"
SERVER_KEY = 0x7FFFFFFF  # folded into the phase key for the server (client ids are < N)


class Phase(Protocol):
    """One broadcast → client_update → aggregate step (``algorithms.base.Phase``)."""

    name: str
    steps: int
    per_client_broadcast: bool

    def broadcast(self, server: PyTree, client_ids: Array, info: RoundInfo) -> PyTree: ...

    def client_update(
        self, base: PyTree, payload: PyTree, state: PyTree, batches: Any, key: Array, info: Any
    ) -> tuple: ...

    @property
    def aggregate(self) -> Callable[..., PyTree] | None: ...


class Algorithm(Protocol):
    """What the engine runs (``algorithms.base.Algorithm``)."""

    phases: tuple[Phase, ...]
    pooled_data: bool
    cache_key: Hashable | None

    def init(self, key: Array, base: PyTree, num_clients: int) -> tuple[PyTree, PyTree]: ...

    def models(self, server: PyTree, clients: PyTree, info: RoundInfo) -> Any: ...


BatchesFn = Callable[[int, Phase, np.ndarray], Mapping[str, Any]]
Batches = BatchesFn | Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How rounds run. Sampling: ``clients_per_round`` or ``client_fraction`` (all when neither)."""

    backend: str = "vmap"  # vmap | chunked | shard_map | mesh | debug (no jit, one at a time)
    mesh: str = ""  # backend mesh: "clients=2,fsdp=4[,tensor=1]" (docs/scaling.md)
    chunk_size: int = 1  # chunked: clients vmapped together inside lax.map
    clients_per_round: int | None = None
    client_fraction: float | None = None
    sampling_rate: float | None = None  # Poisson: each client joins with this probability (DP)
    seed: int = 0  # sampling seed; with the round index it fixes the sampled clients
    rounds: int | None = None  # the run length, given to algorithms as RoundInfo.total_rounds
    donate: bool = True  # donate server/client state buffers to the jitted phase (state consumed)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(
                f"federated.backend={self.backend!r} is not allowed; allowed: {', '.join(BACKENDS)}"
            )
        if self.chunk_size < 1:
            raise ValueError(f"federated.chunk_size={self.chunk_size} must be >= 1")
        if (self.backend == "mesh") != bool(self.mesh):
            raise ValueError(
                f"federated.mesh={self.mesh!r} with federated.backend={self.backend!r}: the mesh "
                "backend needs a mesh (e.g. 'clients=2,fsdp=4') and only it takes one"
            )
        if self.mesh:
            distributed.parse_mesh(self.mesh)


class EngineState(NamedTuple):
    """Everything a run carries between rounds (a pytree: checkpoint it as is).

    client_states leaves carry a leading axis over ALL N clients; ``rng`` is a raw uint32 key.
    """

    server_state: PyTree
    client_states: PyTree
    rng: Array
    round: int


def init_state(algorithm: Algorithm, base: PyTree, num_clients: int, seed: int = 0) -> EngineState:
    """Initial state. A pooled-data algorithm (Centralised) gets one client: the union."""
    key = jax.random.PRNGKey(seed)
    init_key, run_key = jax.random.split(key)
    n = 1 if algorithm.pooled_data else num_clients
    server, clients = algorithm.init(init_key, base, n)
    num_rows(clients, n)  # validates the leading axis
    server, clients = _unalias((server, clients), base)
    return EngineState(server, clients, run_key, 0)


def _unalias(state: PyTree, base: PyTree) -> PyTree:
    """Copy state leaves that are the very array of a base leaf or of an earlier state leaf, so
    donating the state never deletes the base weights or donates one buffer twice."""
    seen = {id(x) for x in jax.tree.leaves(base)}

    def own(x: Any) -> Any:
        if id(x) in seen:
            return jnp.array(x, copy=True)
        seen.add(id(x))
        return x

    return jax.tree.map(own, state)


def num_rows(client_states: PyTree, n: int) -> int:
    """Check that every client-state leaf has the leading client axis N (the state may be
    empty: an algorithm whose clients keep nothing between rounds)."""
    sizes = {x.shape[0] if x.ndim else None for x in jax.tree.leaves(client_states)}
    if sizes - {n}:
        raise ValueError(
            f"client_states leaves must share one leading client axis of {n}; got leading "
            f"sizes {sizes}"
        )
    return n


# ----------------------------------------------------------------------------- backends


@functools.cache
def clients_mesh(num_devices: int) -> jax.sharding.Mesh:
    """A 1-D mesh named ``clients`` over the first ``num_devices`` devices."""
    return jax.make_mesh(
        (num_devices,),
        (MESH_AXIS,),
        axis_types=(jax.sharding.AxisType.Auto,),
        devices=jax.devices()[:num_devices],
    )


def clients_axis(config: EngineConfig) -> int:
    """How many ways the backend splits the sampled clients (K is padded to a multiple)."""
    if config.backend == "shard_map":
        return jax.device_count()
    if config.backend == "mesh":
        return dict(distributed.mesh_of(config.mesh).shape).get(distributed.CLIENTS, 1)
    return 1


def pad_ids(ids: np.ndarray, multiple: int, num_clients: int) -> np.ndarray:
    """``ids`` followed by padding clients up to a multiple of ``multiple`` (a Poisson draw, or
    any K, need not divide over the clients axis). A padding client has the out-of-range id N:
    it is computed (gathers clamp: client N-1's state; ``data_ids``: the first client's batches
    and size) but ``_phase_core`` marks it not valid, the one exclusion mechanism of non-finite
    clients: weight 0, so every aggregate and DP release ignores it (a private sum counts only
    w > 0 and keeps its fixed denominator), and its state write is dropped (scatters drop an
    out-of-range id)."""
    pad = -len(ids) % multiple
    return np.concatenate([ids, np.full(pad, num_clients, np.int32)]).astype(np.int32)


def data_ids(ids: np.ndarray, num_clients: int) -> np.ndarray:
    """The client whose batches each row trains on: a padding client reuses the first one's."""
    return np.where(ids < num_clients, ids, ids[0]).astype(np.int32)


def _debug_clients(phase: Phase) -> Callable[..., tuple]:
    """No jit, a Python loop over the clients; an error names the phase, round and client."""

    def loop(base, payload, states, batches, keys, info, ids):
        outs = []
        for i, cid in enumerate(np.asarray(ids).tolist()):
            row = lambda t, i=i: jax.tree.map(lambda x: x[i], t)  # noqa: E731
            own = row(payload) if phase.per_client_broadcast else payload
            try:
                out = phase.client_update(base, own, row(states), row(batches), keys[i], info)
            except Exception as e:
                raise RuntimeError(
                    f"phase {phase.name!r}, round {int(info.round)}, client {cid}: "
                    f"{type(e).__name__}: {e}"
                ) from e
            outs.append(out)
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    return loop


def map_clients(phase: Phase, config: EngineConfig) -> Callable[..., tuple]:
    """``f(base, payload, client_states[K], batches[K], keys[K], info, ids[K]) -> (uploads,
    states, metrics)`` with a leading K on every output, built for the configured backend."""
    update = phase.client_update
    payload_axis = 0 if phase.per_client_broadcast else None
    vmapped = jax.vmap(update, in_axes=(None, payload_axis, 0, 0, 0, None))
    if config.backend == "debug":
        return _debug_clients(phase)
    if config.backend == "vmap":
        return lambda *args: vmapped(*args[:6])
    if config.backend == "mesh":  # GSPMD: the vmapped client axis is the mesh's clients axis
        mesh = distributed.mesh_of(config.mesh)
        axis = distributed.CLIENTS if distributed.CLIENTS in mesh.shape else None
        over = jax.vmap(update, in_axes=(None, payload_axis, 0, 0, 0, None), spmd_axis_name=axis)
        return lambda *args: over(*args[:6])
    if config.backend == "chunked":

        def chunked(base, payload, states, batches, keys, info, ids):
            if phase.per_client_broadcast:
                xs = (payload, states, batches, keys)
                return jax.lax.map(
                    lambda x: update(base, *x, info), xs, batch_size=config.chunk_size
                )
            xs = (states, batches, keys)
            return jax.lax.map(
                lambda x: update(base, payload, *x, info), xs, batch_size=config.chunk_size
            )

        return chunked

    n_dev = jax.device_count()
    mesh = clients_mesh(n_dev)
    sharded = P(MESH_AXIS)
    payload_spec = sharded if phase.per_client_broadcast else P()
    smapped = jax.shard_map(
        vmapped,
        mesh=mesh,
        in_specs=(P(), payload_spec, sharded, sharded, sharded, P()),
        out_specs=sharded,
        check_vma=False,
    )

    return lambda *args: smapped(*args[:6])  # run_round padded K to a multiple of n_dev


# ----------------------------------------------------------------------------- one phase


def _finite_rows(tree: PyTree, k: int) -> Array:
    """[K] bool: every float entry of the client's row is finite."""
    ok = jnp.ones((k,), bool)
    for x in jax.tree.leaves(tree):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            ok = ok & jnp.isfinite(x).reshape(k, -1).all(axis=1)
    return ok


def _where_rows(mask: Array, new: PyTree, old: PyTree) -> PyTree:
    def pick(n: Array, o: Array) -> Array:
        return jnp.where(mask.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)

    return jax.tree.map(pick, new, old)


def _phase_core(phase: Phase, config: EngineConfig, num_clients: int) -> Callable[..., tuple]:
    """The whole phase as one traceable function (jitted by ``compiled_phase``; traced
    abstractly by ``comm_bytes``, which reads the payload and upload it also returns)."""
    run_clients = map_clients(phase, config)

    def core(
        base: PyTree,
        server: PyTree,
        clients: PyTree,
        ids: Array,
        batches: PyTree,
        rng: Array,
        round_idx: Array,
        phase_idx: Array,
        sizes: Array,
    ) -> tuple:
        k = ids.shape[0]
        key = jax.random.fold_in(jax.random.fold_in(rng, round_idx), phase_idx)
        info = RoundInfo(round_idx, jax.random.fold_in(key, SERVER_KEY), config.rounds, num_clients)
        payload = phase.broadcast(server, ids, info)
        states = jax.tree.map(lambda x: x[ids], clients)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
        uploads, new_states, metrics = run_clients(base, payload, states, batches, keys, info, ids)
        live = ids < num_clients  # not a padding client (pad_ids)
        valid = live & _finite_rows(uploads, k) & _finite_rows(new_states, k)
        uploads = _where_rows(valid, uploads, jax.tree.map(jnp.zeros_like, uploads))
        weights = jnp.where(valid, sizes, 0.0)
        aggregated = jnp.any(weights > 0)
        if phase.aggregate is not None:
            new_server = phase.aggregate(server, uploads, weights, ids, info)
            server = jax.tree.map(lambda n, o: jnp.where(aggregated, n, o), new_server, server)
        new_states = _where_rows(valid, new_states, states)
        clients = jax.tree.map(lambda a, s: a.at[ids].set(s), clients, new_states)
        return server, clients, metrics, valid, aggregated, payload, uploads

    return core


_COMPILED: dict[tuple, Callable[..., tuple]] = {}


def _cache_key(algorithm: Algorithm, p: int) -> Hashable:
    """(name, options, training, phase index) for a registered algorithm, else the phase. The
    phase functions' code objects are part of the key, so a phase swapped in by hand (a wrapper)
    never reuses the registered one's compiled function."""
    phase = algorithm.phases[p]
    if algorithm.cache_key is None:
        return phase
    fns = (phase.broadcast, phase.client_update, phase.aggregate)
    return (algorithm.cache_key, p, *(getattr(f, "__code__", f) for f in fns))


def compiled_phase(
    algorithm: Algorithm, p: int, config: EngineConfig, num_clients: int
) -> Callable[..., tuple]:
    """Phase ``p`` jitted (cached per algorithm cache key, phase and config; jit caches per
    shape)."""
    key = (_cache_key(algorithm, p), config, num_clients)
    if key not in _COMPILED:
        core = _phase_core(algorithm.phases[p], config, num_clients)

        def step(*args: Any) -> tuple:
            out = core(*args)[:5]  # payload and uploads stay on device, unreturned
            if config.backend != "mesh":
                return out
            server, clients, rest = distributed.constrain_outputs(
                distributed.mesh_of(config.mesh), out[0], out[1], out[2:]
            )
            return (server, clients, *rest)

        _COMPILED[key] = jax.jit(step, donate_argnums=(1, 2) if config.donate else ())
    return _COMPILED[key]


def _signature(*trees: PyTree) -> tuple:
    leaves, treedef = jax.tree.flatten(trees)
    return treedef, tuple((np.shape(x), np.dtype(x.dtype)) for x in leaves)


_COMM_CACHE: dict[tuple, tuple[PyTree, PyTree]] = {}


def comm_bytes(
    algorithm: Algorithm,
    p: int,
    config: EngineConfig,
    num_clients: int,
    *args: PyTree,
    client_metrics: Mapping[str, Any] | None = None,
) -> tuple[float, float]:
    """(down, up) bytes per client for phase ``p``, from the traced payload and upload shapes
    (at each client's rank when ``client_metrics`` report ranks: ``federated.comm``).

    ``args`` are the jitted phase's arguments; the shapes are traced once per signature.
    """
    phase = algorithm.phases[p]
    key = (_cache_key(algorithm, p), config, num_clients, _signature(*args))
    if key not in _COMM_CACHE:
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), args)
        with _mesh_context(config):
            out = jax.eval_shape(_phase_core(phase, config, num_clients), *shapes)
        _COMM_CACHE[key] = (out[5], out[6])
    aggregates = phase.aggregate is not None
    return phase_bytes(*_COMM_CACHE[key], phase.per_client_broadcast, aggregates, client_metrics)


def _mesh_context(config: EngineConfig) -> Any:
    """The mesh backend traces under its mesh (``distributed.shard_batch_rows`` reads it)."""
    if config.backend != "mesh":
        return contextlib.nullcontext()
    return jax.set_mesh(distributed.mesh_of(config.mesh))


# ----------------------------------------------------------------------------- the round


BATCH_KEYS = ("tokens", "loss_mask", "attn_mask")


def phase_batches(
    batches: Batches, round_idx: int, phase: Phase, ids: np.ndarray, num_clients: int
) -> dict[str, Any]:
    """The sampled clients' batches [K, steps, batch, seq] for one phase.

    ``batches`` is a function (round, phase, client_ids) -> batches[K, ...]; or batches for all
    N clients [N, steps, batch, seq] (rows gathered here); or {phase name: such batches}.
    """
    if callable(batches):
        got = dict(batches(round_idx, phase, ids))
        rows = len(ids)
    else:
        got = dict(batches.get(phase.name, batches))
        rows = num_clients
    missing = [k for k in BATCH_KEYS if k not in got]
    if missing:
        raise ValueError(f"batches for phase {phase.name!r} lack keys {missing}; need {BATCH_KEYS}")
    shape = np.shape(got["tokens"])
    if len(shape) != 4 or shape[0] != rows or shape[1] != phase.steps:
        raise ValueError(
            f"batches for phase {phase.name!r} have shape {shape}; expected "
            f"[{rows} clients, {phase.steps} steps, batch, seq]"
        )
    if not callable(batches):
        got = {k: np.asarray(v)[ids] for k, v in got.items()}
    return got


def _host_metrics(phase: Phase, ids: np.ndarray, metrics: dict, valid: np.ndarray) -> dict:
    out: dict[str, Any] = {}
    for name, values in metrics.items():
        values = np.asarray(values, np.float64)
        out[f"{phase.name}/{name}"] = float(values[valid].mean()) if valid.any() else float("nan")
        out[f"{phase.name}/per_client/{name}"] = values.tolist()
    out[f"{phase.name}/excluded"] = ids[~valid].tolist()
    return out


def _empty_round(
    algorithm: Algorithm, state: EngineState, config: EngineConfig, n: int, start: float
) -> tuple[EngineState, dict[str, Any]]:
    """A round whose Poisson draw is empty: nobody trains, but a private algorithm still releases
    its noise (``release_without_clients``, privacy.private); for any other it is an error."""
    release = getattr(algorithm, "release_without_clients", None)
    if release is None:
        raise ValueError(f"round {state.round}: no clients sampled")
    server = release(state.server_state, state.rng, state.round, config.rounds, n)
    comm = ("down_bytes_per_client", "up_bytes_per_client", "down_bytes", "up_bytes")
    metrics = {"round": state.round, "clients": [], **{f"comm/{k}": 0 for k in comm}}
    metrics["time_s"] = time.perf_counter() - start
    return EngineState(server, state.client_states, state.rng, state.round + 1), metrics


def run_round(
    algorithm: Algorithm,
    state: EngineState,
    base: PyTree,
    batches: Batches,
    client_sizes: Any,
    config: EngineConfig = EngineConfig(),
) -> tuple[EngineState, dict[str, Any]]:
    """One federated round; returns the new state and the round metrics.

    ``client_sizes`` [N] are the clients' training-set sizes (aggregation weights). With
    ``config.donate`` the input state's buffers are consumed: keep only the returned state.
    Metrics: per phase ``<phase>/<metric>`` (mean over valid clients), ``<phase>/per_client/...``,
    ``<phase>/excluded`` (non-finite clients), ``<phase>/aggregated``; ``comm/*`` bytes.
    """
    start = time.perf_counter()
    sizes = np.asarray(client_sizes, np.float32).reshape(-1)
    if algorithm.pooled_data:
        n = num_rows(state.client_states, 1)
        ids = np.zeros((1,), np.int32)
        sizes = np.asarray([sizes.sum()], np.float32)
    else:
        n = sizes.shape[0]
        rows = {np.shape(x)[0] for x in jax.tree.leaves(state.client_states)}
        if rows - {n}:
            raise ValueError(f"client_sizes has {n} entries; the state has {rows.pop()} clients")
        ids = (
            sample_clients(
                config.seed, state.round, n, config.clients_per_round, config.client_fraction
            )
            if config.sampling_rate is None
            else poisson_sample(config.seed, state.round, n, config.sampling_rate)
        )
    if len(ids) == 0:
        return _empty_round(algorithm, state, config, n, start)
    k = len(ids)
    padded = pad_ids(ids, clients_axis(config), n)
    if len(padded) > k:
        log.info("%s: %d padding clients after %d sampled", config.backend, len(padded) - k, k)
    rows_data = data_ids(padded, n)
    metrics: dict[str, Any] = {"round": state.round, "clients": ids.tolist()}
    down = up = 0
    compiled = False
    server, clients = state.server_state, state.client_states
    if config.backend == "mesh":
        mesh = distributed.mesh_of(config.mesh)
        base = distributed.place_base(mesh, base)
        server, clients = distributed.place_state(mesh, server, clients)
    round_idx = np.int32(state.round)
    for p, phase in enumerate(algorithm.phases):
        if config.backend == "mesh":  # this process prepares only the rows its devices hold
            b = distributed.client_batches(
                mesh,
                len(padded),
                lambda rows, phase=phase: phase_batches(
                    batches, state.round, phase, rows_data[rows], n
                ),
            )
        else:
            b = phase_batches(batches, state.round, phase, rows_data, n)
        args = (
            base,
            server,
            clients,
            padded,
            b,
            state.rng,
            round_idx,
            np.int32(p),
            sizes[rows_data],
        )
        if config.backend == "debug":  # eager: count the bytes actually sent
            out = _phase_core(phase, config, n)(*args)
            sent = (out[5], out[6])
            server, clients, *on_device = out[:5]
        else:
            sent = None
            compiled |= compiles((_cache_key(algorithm, p), config, n, _signature(*args)))
            with _mesh_context(config):
                server, clients, *on_device = compiled_phase(algorithm, p, config, n)(*args)
        phase_metrics, valid, aggregated = jax.device_get(on_device)  # one sync per phase
        phase_metrics, valid = jax.tree.map(lambda x: x[:k], (phase_metrics, valid))  # unpad
        if sent is None:
            d, u = comm_bytes(algorithm, p, config, n, *args, client_metrics=phase_metrics)
        else:  # debug: the arrays actually sent
            aggregates = phase.aggregate is not None
            d, u = phase_bytes(*sent, phase.per_client_broadcast, aggregates, phase_metrics)
        if phase.payload_held and state.round > 0:  # the previous round's clients hold it
            before = sample_clients(
                config.seed, state.round - 1, n, config.clients_per_round, config.client_fraction
            )
            d *= first_download_share(ids, before)
        down, up = down + d, up + u
        metrics.update(_host_metrics(phase, ids, phase_metrics, valid))
        metrics[f"{phase.name}/aggregated"] = bool(aggregated) if phase.aggregate else False
        if not valid.all():
            log.warning(
                "round %d phase %s: clients %s sent non-finite values; excluded",
                state.round,
                phase.name,
                ids[~valid].tolist(),
            )
        if phase.aggregate is not None and not aggregated:
            log.warning(
                "round %d phase %s: no valid client; server state kept", state.round, phase.name
            )
    if algorithm.pooled_data:
        down = up = 0  # one process holds the pooled data: nothing is communicated
    if compiled:  # the compiler's freed heap would otherwise stay resident (host_memory)
        release_free_heap()
    metrics.update(
        {
            "comm/down_bytes_per_client": down,
            "comm/up_bytes_per_client": up,
            "comm/down_bytes": down * k,
            "comm/up_bytes": up * k,
            "time_s": time.perf_counter() - start,
        }
    )
    return EngineState(server, clients, state.rng, state.round + 1), metrics


def models(
    algorithm: Algorithm,
    state: EngineState,
    num_clients: int,
    config: EngineConfig = EngineConfig(),
) -> Any:
    """The algorithm's ``Models`` (global, personal, personal-is-global) for ``state``."""
    n = 1 if algorithm.pooled_data else num_clients
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.round), SERVER_KEY)
    info = RoundInfo(jnp.int32(state.round), key, config.rounds, n)
    return algorithm.models(state.server_state, state.client_states, info)


@dataclasses.dataclass(frozen=True)
class FederatedSettings(Section):
    """The ``federated`` section of a run config: rounds, sampling, client work and backend."""

    section = "federated"
    rounds: int = setting(3, "rounds in the run", low=1)
    clients_per_round: int = setting(0, "clients sampled per round; 0 = every client", low=0)
    client_fraction: float = setting(
        0.0, "> 0: sample max(1, round(fraction * N)) clients per round", low=0
    )
    local_steps: int = setting(2, "client steps per round", low=1)
    batch_size: int = setting(4, "rows per client step", low=1)
    backend: str = setting("vmap", "how a round's clients run (docs/engine.md)", choices=BACKENDS)
    chunk_size: int = setting(2, "chunked backend: clients per lax.map step", low=1)
    mesh: str = setting("", "mesh backend: e.g. clients=2,fsdp=4 (docs/scaling.md)")
    donate: bool = setting(True, "donate the round state's buffers to the jitted phase")
    packing: bool = setting(True, "several examples per row (data.batches.packed_round_batches)")
    client_ranks: str = setting(
        "",
        "per-client LoRA ranks: '' = all at adapter.r, '2,4,8,8', 'cycle:2,4,8' or "
        "'uniform:2,4,8' (drawn with run.seed)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.client_fraction > 1:
            raise self.fail("client_fraction", "must be in [0, 1]")
        if self.clients_per_round and self.client_fraction:
            raise ConfigError(
                "federated.clients_per_round and federated.client_fraction are both set; "
                "set one (the other 0)"
            )

    def engine_config(self, seed: int) -> EngineConfig:
        """How the engine runs these rounds (sampling seeded with ``seed``)."""
        return EngineConfig(
            backend=self.backend, chunk_size=self.chunk_size, mesh=self.mesh,
            clients_per_round=self.clients_per_round or None,
            client_fraction=self.client_fraction or None,
            seed=seed, rounds=self.rounds, donate=self.donate,
        )  # fmt: skip
