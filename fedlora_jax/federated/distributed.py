"""Beyond one device: the ``clients x fsdp (x tensor)`` mesh and where each round input lives.

The round stays one SPMD program (jit + named shardings, GSPMD partitions it), as in MaxText's
DiLoCo trainer, where a ``diloco`` axis sits beside the fsdp axes:

- the base weights are split by the partition rules of ``model/sharding.py`` over ``fsdp`` (and
  ``tensor``), replicated over ``clients``;
- client rows (states, batches, keys, per-client payloads) are split over ``clients`` on their
  leading axis, and each client's batch over ``fsdp`` on its batch axis when it divides (FSDP's
  data parallelism inside a client); otherwise the client's batch is computed on every ``fsdp``
  device of its group (correct, just redundant: ``batch_spec`` says which);
- the server state is replicated (adapters are small).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fedlora_jax.model.sharding import (
    DEFAULT_RULES,
    FSDP,
    REPLICATE_LIMIT_BYTES,
    TENSOR,
    Rule,
    shardings,
)

PyTree = Any
T = TypeVar("T")
CLIENTS = "clients"
MESH_AXES = (CLIENTS, FSDP, TENSOR)


class MeshError(ValueError):
    """A mesh spec that cannot be built on the devices at hand."""


def parse_mesh(text: str, key: str = "federated.mesh") -> dict[str, int]:
    """``"clients=2,fsdp=4"`` -> ``{"clients": 2, "fsdp": 4}`` (axes in MESH_AXES order)."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES or not value.strip().isdigit() or int(value) < 1:
            raise MeshError(
                f"{key}={text!r}: bad entry {part!r}; expected axis=size with axis in "
                f"{', '.join(MESH_AXES)} and size >= 1, e.g. 'clients=2,fsdp=4'"
            )
        if name in sizes:
            raise MeshError(f"{key}={text!r}: axis {name!r} given twice")
        sizes[name] = int(value)
    if not sizes:
        raise MeshError(f"{key}={text!r}: empty; e.g. 'clients=2,fsdp=4'")
    return {a: sizes[a] for a in MESH_AXES if a in sizes}


def make_mesh(axes: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh of ``axes`` over ``devices`` (all of them by default; their number must match)."""
    devices = list(jax.devices() if devices is None else devices)
    need = math.prod(axes.values())
    if need != len(devices):
        spec = ",".join(f"{a}={n}" for a, n in axes.items())
        raise MeshError(
            f"federated.mesh={spec!r} needs {need} devices; {len(devices)} are available"
        )
    return jax.make_mesh(
        tuple(axes.values()),
        tuple(axes),
        axis_types=(jax.sharding.AxisType.Auto,) * len(axes),
        devices=devices,
    )


def _size(mesh: Mesh, axis: str) -> int:
    return dict(mesh.shape).get(axis, 1)


def rows_spec(mesh: Mesh, rows: int) -> P:
    """Leading client axis over ``clients`` (it must divide)."""
    check_sampled(rows, _size(mesh, CLIENTS))
    return P(CLIENTS) if CLIENTS in mesh.shape else P()


def check_sampled(sampled: int, clients_axis: int) -> None:
    """K sampled clients must split evenly over the mesh's ``clients`` axis (one line if not)."""
    if sampled % clients_axis:
        raise MeshError(
            f"{sampled} sampled clients per round do not divide over federated.mesh's "
            f"clients={clients_axis}; set federated.clients_per_round (or client_fraction) to "
            f"a multiple of {clients_axis}, or make the clients axis divide {sampled}"
        )


def batch_spec(mesh: Mesh, batch_size: int) -> P:
    """Batches [K, steps, batch, seq]: K over clients, batch over fsdp when it divides."""
    k = P(CLIENTS) if CLIENTS in mesh.shape else P(None)
    split = FSDP in mesh.shape and _size(mesh, FSDP) > 1 and batch_size % _size(mesh, FSDP) == 0
    return P(*k, None, FSDP) if split else k


def named(mesh: Mesh, spec: P) -> NamedSharding:
    return NamedSharding(mesh, spec)


def client_rows_sharding(mesh: Mesh, tree: PyTree) -> PyTree:
    """Per-leaf shardings of a tree whose leaves all lead with the client axis."""
    return jax.tree.map(lambda x: named(mesh, rows_spec(mesh, np.shape(x)[0])), tree)


def base_sharding(
    mesh: Mesh,
    base: PyTree,
    rules: Sequence[Rule] = DEFAULT_RULES,
    replicate_limit_bytes: int = REPLICATE_LIMIT_BYTES,
) -> PyTree:
    return shardings(base, mesh, rules, replicate_limit_bytes)


def shard_batch_rows(x: jax.Array) -> jax.Array:
    """Keep a per-client activation's batch rows split over ``fsdp`` (identity off a mesh).

    Called on the final hidden states before the chunked LM loss, whose token loop would
    otherwise pull the whole batch onto every ``fsdp`` device; GSPMD then propagates that back
    through every layer (each matmul becomes a partial sum all-reduced over ``fsdp``: 180 GB vs
    4 GB of all-reduce per device in a 7B round, scripts/plan.py). Under the mesh backend's
    ``vmap(spmd_axis_name="clients")`` the client axis is added to the constraint.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or FSDP not in mesh.axis_names or x.shape[0] % dict(mesh.shape)[FSDP]:
        return x
    return jax.lax.with_sharding_constraint(x, P(FSDP))


# ----------------------------------------------------------------------------- several processes


ENV_COORDINATOR = "FEDLORA_COORDINATOR"  # host:port of process 0
ENV_NUM_PROCESSES = "FEDLORA_NUM_PROCESSES"
ENV_PROCESS_ID = "FEDLORA_PROCESS_ID"
ENV_DETECT = "FEDLORA_DISTRIBUTED"  # "1": start the runtime, JAX detects the cluster


def _cluster_detected(env: Mapping[str, str]) -> bool:
    """A launcher jax.distributed can read by itself: SLURM with >1 task, a TPU slice whose
    environment lists several workers (GKE, queued resources), or ``FEDLORA_DISTRIBUTED=1``
    (e.g. a TPU VM pod slice, whose workers JAX finds from the metadata server)."""
    slurm = int(env.get("SLURM_NTASKS", "1") or "1") > 1
    workers = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES", "")
    tpu_pod = len([h for h in workers.split(",") if h]) > 1
    asked = env.get(ENV_DETECT, "").lower() in ("1", "true", "yes")
    return slurm or tpu_pod or asked


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> bool:
    """Start JAX's multi-controller runtime when this is one of several processes.

    Explicit arguments win, then ``FEDLORA_COORDINATOR`` / ``FEDLORA_NUM_PROCESSES`` /
    ``FEDLORA_PROCESS_ID``, then jax's own cluster detection where ``_cluster_detected`` sees a
    launcher (SLURM, TPU slices, ``FEDLORA_DISTRIBUTED=1``). Returns False (nothing started) for
    a single process. On CPU the collectives go through gloo.
    """
    env = os.environ if env is None else env
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    if num_processes is None and env.get(ENV_NUM_PROCESSES):
        num_processes = _env_int(env, ENV_NUM_PROCESSES)
    if process_id is None and env.get(ENV_PROCESS_ID):
        process_id = _env_int(env, ENV_PROCESS_ID)
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise MeshError(
                "multi-process run: give all of coordinator (host:port), num_processes and "
                f"process_id (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); got "
                f"coordinator={coordinator!r}, num_processes={num_processes}, "
                f"process_id={process_id}"
            )
        if not 0 <= process_id < num_processes:
            raise MeshError(f"process_id={process_id} must be in [0, {num_processes})")
    elif not _cluster_detected(env):
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only
    jax.distributed.initialize(coordinator, num_processes, process_id)
    return True


def _env_int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise MeshError(f"{key}={env[key]!r} must be an integer") from None


def is_primary() -> bool:
    """Process 0 writes logs, metrics and artifacts; the others only compute."""
    return jax.process_index() == 0


def config_digest(resolved: Mapping[str, Any]) -> str:
    """sha256 of the resolved config as canonical JSON (what every process must agree on)."""
    text = json.dumps(resolved, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def differing_processes(digest: str) -> list[int]:
    """The processes whose sha256 hex ``digest`` differs from process 0's (a collective: every
    process calls it); [] in a single process."""
    if jax.process_count() == 1:
        return []
    from jax.experimental import multihost_utils

    mine = np.frombuffer(bytes.fromhex(digest), np.uint32)
    everyone = np.asarray(multihost_utils.process_allgather(mine))
    return [i for i, row in enumerate(everyone) if not np.array_equal(row, everyone[0])]


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (nothing in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def host_local(tree: PyTree) -> PyTree:
    """``tree`` with every array that spans other processes' devices gathered to a host numpy
    copy (a collective: every process calls it); other leaves as they are. For work every
    process then does alone and alike (evaluation)."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    def local(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return x

    return jax.tree.map(local, tree)


def check_same_config(resolved: Mapping[str, Any]) -> None:
    """Every process holds the same resolved config, or one clear error on every process."""
    start_together(lambda: None, lambda _: resolved)


START_MESSAGE_BYTES = 2000  # a start-up error is one line; a longer one is cut


class StartError(MeshError):
    """Some process failed to start; every process raises this, naming the failed processes
    and their errors (``failures``: process -> one-line message), in one line."""

    def __init__(self, failures: Mapping[int, str]) -> None:
        self.failures = dict(failures)
        super().__init__("; ".join(f"process {i}: {m}" for i, m in self.failures.items()))


def start_together(work: Callable[[], T], config_of: Callable[[T], Mapping[str, Any]]) -> T:
    """``work()`` (the start-up that can fail on one host only: config checks, data, model, run
    directory) on every process, then ONE agreement step (a collective): each process reports
    ok with the sha256 of ``config_of(result)``, or its error's message. If any failed, every
    process raises ``StartError`` naming them, rather than the others waiting for ever in a
    later collective the failed one never reaches; else, if a config differs from process
    0's, every process raises one line naming them. A single process just runs ``work``."""
    if jax.process_count() == 1:
        return work()
    result, failure, digest = None, None, bytes(32)
    try:
        result = work()
        digest = bytes.fromhex(config_digest(config_of(result)))
    except Exception as e:  # reported to every process below, then raised from on this one
        failure = e
    text = "" if failure is None else _one_line(failure)
    row = np.zeros(1 + 32 + START_MESSAGE_BYTES, np.uint8)
    row[0], row[1:33] = failure is not None, np.frombuffer(digest, np.uint8)
    message = text.encode()[:START_MESSAGE_BYTES]
    row[33 : 33 + len(message)] = np.frombuffer(message, np.uint8)
    from jax.experimental import multihost_utils

    everyone = np.asarray(multihost_utils.process_allgather(row))
    failures = {
        i: bytes(r[33:]).rstrip(b"\0").decode(errors="replace")
        for i, r in enumerate(everyone)
        if r[0]
    }
    if failures:
        raise StartError(failures) from failure
    differ = [i for i, r in enumerate(everyone) if not np.array_equal(r[1:33], everyone[0, 1:33])]
    if differ:
        raise MeshError(
            f"processes disagree on the config: process(es) {differ} differ from process 0 "
            f"(this is process {jax.process_index()}, config sha256 {digest.hex()[:12]}); launch "
            "every process with the same config file and overrides"
        )
    return result


def _one_line(error: Exception) -> str:
    """A user error's own line (ValueError: ConfigError, DataError, ...); else its type too."""
    text = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
    return " ".join(text.splitlines())


# ----------------------------------------------------------------------------- placing a round


@functools.cache
def mesh_of(spec: str) -> Mesh:
    """The mesh a ``federated.mesh`` string names, over all devices of all processes."""
    return make_mesh(parse_mesh(spec))


def state_spec(mesh: Mesh, x: Any) -> P:
    """Client-state rows over ``clients`` when N divides, else replicated (adapters are small)."""
    shape = np.shape(x)
    if CLIENTS in mesh.shape and shape and shape[0] % _size(mesh, CLIENTS) == 0:
        return P(CLIENTS)
    return P()


def to_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """``x`` (the same value on every process) as a global array; only local blocks are made.
    An array already placed so is returned as it is."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and x.is_fully_addressable and jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_state(mesh: Mesh, server: PyTree, clients: PyTree) -> tuple[PyTree, PyTree]:
    rep = named(mesh, P())
    server = jax.tree.map(lambda x: to_global(x, rep), server)
    clients = jax.tree.map(lambda x: to_global(x, named(mesh, state_spec(mesh, x))), clients)
    return server, clients


def place_base(mesh: Mesh, base: PyTree, rules: Sequence[Rule] = DEFAULT_RULES) -> PyTree:
    """The base split by the partition rules (a no-op for a base ``sharded_load`` placed)."""
    return jax.tree.map(to_global, base, base_sharding(mesh, base, rules))


def client_batches(
    mesh: Mesh, k: int, fetch: Callable[[np.ndarray], Mapping[str, np.ndarray]]
) -> dict[str, jax.Array]:
    """Batches [K, steps, batch, seq] as global arrays; ``fetch(rows)`` is asked only for the
    rows (positions in the sampled list) this process's devices hold."""
    probe = NamedSharding(mesh, rows_spec(mesh, k))
    mine = sorted(
        {r for idx in probe.addressable_devices_indices_map((k,)).values()
         for r in range(*idx[0].indices(k))}
    )  # fmt: skip
    local = {name: np.asarray(v) for name, v in fetch(np.asarray(mine)).items()}
    pos = {r: i for i, r in enumerate(mine)}
    out = {}
    for name, rows in local.items():
        shape = (k, *rows.shape[1:])
        sharding = NamedSharding(mesh, batch_spec(mesh, shape[2]))

        def block(index: tuple, rows: np.ndarray = rows) -> np.ndarray:
            picked = rows[[pos[r] for r in range(*index[0].indices(k))]]
            return picked[(slice(None), *index[1:])]

        out[name] = jax.make_array_from_callback(shape, sharding, block)
    return out


def constrain_outputs(mesh: Mesh, server: PyTree, clients: PyTree, rest: PyTree) -> tuple:
    """Inside the jitted phase: server and small outputs replicated (every process reads them),
    client rows as ``state_spec`` placed them."""
    rep = named(mesh, P())
    wsc = jax.lax.with_sharding_constraint
    server = jax.tree.map(lambda x: wsc(x, rep), server)
    clients = jax.tree.map(lambda x: wsc(x, named(mesh, state_spec(mesh, x))), clients)
    rest = jax.tree.map(lambda x: wsc(x, rep), rest)
    return server, clients, rest
