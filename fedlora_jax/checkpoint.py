"""Round checkpoints: one orbax step per saved round, holding the whole run state and metadata.

A step has two items: ``state`` (any pytree of arrays: server state, every client's persistent
state, optimizer states, the RNG key; orbax ``StandardSave``) and ``meta`` (JSON: round, metric
history, and the run's ``identity``, e.g. algorithm, adapter kind and rank, so that a checkpoint
restored into another config is named in one line instead of an orbax tree dump).

Saves are asynchronous: ``save`` returns once the arrays are copied off the device and orbax
writes them in a background thread while the next round trains; ``wait``/``close`` (and the next
``save``) block on it and report a failed write as one ``CheckpointError`` naming the step.
``save`` first checks that the filesystem has room for the step.

Orbax writes a step into ``<step>.orbax-checkpoint-tmp-*`` and renames it when complete, so an
interrupted save leaves the previous step intact. ``latest_step`` only trusts steps that orbax
finalized (its commit marker and step metadata exist), so a partial step directory left by a copy
or a non-atomic filesystem is skipped, and moved aside on resume. A finalized step that cannot be
read (e.g. a truncated data file) is skipped with a warning when restoring the latest step.

Several processes (``jax.distributed``): every process calls ``save`` and ``restore`` alike on a
directory all of them see. Arrays spanning the processes' devices are written shard by shard.
Host-local values (numpy arrays, Python scalars, arrays on this process's devices only: the
engine's PRNG key and round counter) must be the same on every process; they are checked
(sha256 exchanged, one error naming the processes that differ), written once as replicated
arrays, and restored as host-local values again.

A checkpoint saved before FedALT's, FedLoRA-Optimizer's and FedGaLore's states were typed
(commit 1164ab2) holds them as dicts; ``restore`` reads it in that layout and converts it
(``dict_layout``), with a warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fedlora_jax.federated import distributed
from fedlora_jax.settings import Section, setting

PyTree = Any
log = logging.getLogger(__name__)

_FINAL_MARKERS = ("_CHECKPOINT_METADATA", "commit_success.txt")
_ITEMS = ("state", "meta")
_OS_ERROR = re.compile(r"\[os_error_code='(\d+)'\]")


class CheckpointError(ValueError):
    """A checkpoint cannot be written, read, or does not belong to this config (one line)."""


class _OrbaxErrorFilter(logging.Filter):
    """Drops orbax's background-thread error tracebacks: ``Checkpointer`` re-raises each failure
    as one ``CheckpointError`` line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


_ORBAX_FILTER = _OrbaxErrorFilter()


class Checkpointer:
    """``CheckpointManager`` over ``directory`` keeping the newest ``keep`` complete rounds.

    ``identity`` (JSON scalars, e.g. algorithm, adapter kind, rank) is stored in every step's
    meta and compared on restore."""

    def __init__(
        self,
        directory: str | pathlib.Path,
        *,
        keep: int = 2,
        identity: dict[str, Any] | None = None,
    ) -> None:
        self.directory = pathlib.Path(directory).resolve()
        self._keep = keep
        self._identity = identity
        self._pending: tuple[int, int] | None = None  # (step, bytes) being written
        logging.getLogger("absl").addFilter(_ORBAX_FILTER)
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True)
        return ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

    def save(self, step: int, state: PyTree, meta: dict[str, Any]) -> None:
        """Start saving ``state`` and ``meta`` as ``step`` (asynchronous; see ``wait``)."""
        self.wait()
        storable = _shared(_storable(state), f"checkpoint {self._step_dir(step)}")
        if self._identity is not None:
            meta = {**meta, "identity": self._identity}
        need = _nbytes(storable) + len(json.dumps(meta))
        self._check_free(need, f"checkpoint {self._step_dir(step)}")
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(storable), meta=ocp.args.JsonSave(meta)
        )
        self._pending = (step, need)
        with self._reporting():
            self._manager.save(step, args=args, force=True)

    def wait(self) -> None:
        """Block until the last save is finalized on disk."""
        with self._reporting():
            self._manager.wait_until_finished()
        self._pending = None

    def ensure_space(self, state: PyTree, copies: int) -> None:
        """Raise ``CheckpointError`` unless the filesystem has room for ``copies`` checkpoints of
        ``state`` (e.g. at the start of a run, rather than failing in a later round)."""
        self._check_free(copies * _nbytes(_storable(state)), f"{copies} checkpoints in")

    def _check_free(self, need: int, what: str) -> None:
        free = shutil.disk_usage(self.directory).free
        if free < need:
            where = what if what.startswith("checkpoint ") else f"{what} {self.directory}"
            raise CheckpointError(
                f"{where}: need {_mb(need)} of free space, only {_mb(free)} free{self._intact()}"
            )

    def complete_steps(self) -> list[int]:
        """Steps orbax finalized, oldest first."""
        self.wait()
        return sorted(s for s in self._manager.all_steps() if _is_complete(self._step_dir(s)))

    def latest_step(self) -> int | None:
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def check_identity(self, step: int | None = None) -> None:
        """Raise ``CheckpointError`` if ``step`` (default: the latest complete one) was saved by a
        run of another identity; a step saved without one passes (its restore reports a
        mismatch)."""
        step = self._existing(step)
        saved = self._read_meta(step).get("identity")
        if self._identity is not None and saved is not None and saved != self._identity:
            raise CheckpointError(
                f"{self._step_dir(step)}: the checkpoint holds {_describe(saved)}; the config "
                f"asks for {_describe(self._identity)}"
            )

    def restore(self, like: PyTree, step: int | None = None) -> tuple[PyTree, dict[str, Any]]:
        """Restore ``step`` (default: the latest complete one) into the structure of ``like``.

        Without ``step``, a latest step that cannot be read falls back to the previous one with a
        warning, and is renamed ``<step>.damaged``; incomplete step directories newer than the
        restored one are renamed ``<step>.incomplete``. Either way the resumed run can save
        those rounds again.
        """
        candidates = [self._existing(step)] if step is not None else self.complete_steps()[::-1]
        if not candidates:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint to resume from")
        failures: list[str] = []
        for s in candidates:
            self.check_identity(s)
            try:
                state, meta = self._restore(s, like)
            except ValueError as e:
                failures.append(f"{self._step_dir(s)} ({_brief(e)})")
                _quiet_failed_read_leftovers()
                continue
            for bad in failures:
                log.warning("checkpoint %s is unreadable; using round %d instead", bad, s)
            self._set_aside(after=s, damaged=candidates[: len(failures)])
            return state, meta
        hint = (
            "" if self._identity is None else f" (the config asks for {_describe(self._identity)})"
        )
        raise CheckpointError(
            f"no checkpoint could be restored into the state this config builds{hint}: "
            + "; ".join(failures)
        )

    def close(self) -> None:
        try:
            self.wait()
        except CheckpointError:
            self._close_quietly()
            raise
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        with contextlib.suppress(CheckpointError):  # an error is already on its way
            self.close()

    def _existing(self, step: int | None) -> int:
        steps = self.complete_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"{self.directory}: no complete checkpoint to resume from")
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint for round {step}")
        return step

    def _read_meta(self, step: int) -> dict[str, Any]:
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except ValueError:
            return {}  # unreadable: ``restore`` names it
        return dict(meta.meta or {})

    def _restore(self, step: int, like: PyTree) -> tuple[PyTree, dict[str, Any]]:
        """Restore into ``like``; a step saved before the algorithms' states were typed is read
        in their dict layout and converted (``dict_layout``), with a warning."""
        try:
            return self._restore_as(step, like)
        except ValueError as e:
            old = dict_layout(like)
            if jax.tree.structure(old) == jax.tree.structure(like):
                raise  # no typed state: nothing was saved otherwise
            _quiet_failed_read_leftovers()
            try:
                state, meta = self._restore_as(step, old)
            except ValueError:
                raise e from None  # not the dict layout either: the typed read's failure
        log.warning(
            "checkpoint %s holds the algorithm's states as dicts (saved before commit 1164ab2 "
            "typed them); converted to the typed states",
            self._step_dir(step),
        )
        return typed_like(state, like), meta

    def _restore_as(self, step: int, like: PyTree) -> tuple[PyTree, dict[str, Any]]:
        target = jax.tree.map(_restore_target, _storable(like))
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        )
        out = self._manager.restore(step, args=args)
        restored = jax.tree.map(_back_to_host, out.state, target)
        return _like(restored, like), dict(out.meta)

    def _step_dir(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def _set_aside(self, after: int, damaged: list[int]) -> None:
        moved = False
        primary = jax.process_index() == 0  # one process renames; the others see it done
        for step in self._manager.all_steps():
            path = self._step_dir(step)
            new = None
            if step in damaged:
                new = f"{step}.damaged"
            elif step > after and path.exists() and not _is_complete(path):
                new = f"{step}.incomplete"
            if new is not None:
                if primary:
                    path.rename(path.with_name(new))
                moved = True
        if moved:
            distributed.barrier(f"checkpoint set aside {self.directory}")
            self._manager.close()
            self._manager = self._open()

    @contextlib.contextmanager
    def _reporting(self) -> Iterator[None]:
        """Turn an orbax write failure (raised on this thread by ``save``/``wait``, possibly for
        the previous step) into one ``CheckpointError`` naming the step and the space it needs."""
        try:
            yield
        except (ValueError, OSError) as e:
            if isinstance(e, CheckpointError) or self._pending is None:
                raise
            (step, need), self._pending = self._pending, None
            free = shutil.disk_usage(self.directory).free
            raise CheckpointError(
                f"checkpoint {self._step_dir(step)} could not be written: {_reason(e)}; it needs "
                f"about {_mb(need)} of free space, {_mb(free)} free{self._intact()}"
            ) from None

    def _close_quietly(self) -> None:
        with contextlib.suppress(ValueError, OSError):  # the failed save, already reported
            self._manager.close()

    def _intact(self) -> str:
        steps = [s for s in self._manager.all_steps() if _is_complete(self._step_dir(s))]
        return f"; checkpoint {self._step_dir(max(steps))} is intact" if steps else ""


def _quiet_failed_read_leftovers() -> None:
    """A failed orbax read leaves work behind that reports the same failure again, as Python
    "unraisable" dumps: its coroutines when collected, and tensorstore callbacks that post to
    orbax's closed event loop ("Event loop is closed") a moment later. The caller reports the
    failure in one line; from now on those echoes are dropped (every other unraisable still
    reaches the previous hook), and the coroutines are collected now."""
    if not isinstance(sys.unraisablehook, _DropReadLeftovers):
        sys.unraisablehook = _DropReadLeftovers(sys.unraisablehook)
    gc.collect()


class _DropReadLeftovers:
    def __init__(self, previous: Callable[[Any], object]) -> None:
        self.previous = previous

    def __call__(self, u: Any) -> None:
        code = getattr(u.object, "cr_code", None)
        orbax_coroutine = code is not None and "orbax" in code.co_filename
        closed_loop = isinstance(u.exc_value, RuntimeError) and (
            str(u.exc_value) == "Event loop is closed"
        )
        if not (orbax_coroutine or closed_loop):
            self.previous(u)


def _typed(node: Any) -> bool:
    """A typed algorithm state: a flax ``struct`` dataclass instance."""
    return getattr(type(node), "_flax_dataclass", False)


def _stored_fields(node: Any) -> list[tuple[str, str, Any]]:
    """(field, its key in the dict layout, value) of the fields a dict-layout state stored:
    the pytree fields that hold something ({} was never stored), keys renamed as the class's
    ``dict_keys`` says (default: the field's name)."""
    renames = getattr(node, "dict_keys", {})
    return [
        (f.name, renames.get(f.name, f.name), getattr(node, f.name))
        for f in dataclasses.fields(node)
        if f.metadata.get("pytree_node", True) and not _empty(getattr(node, f.name))
    ]


def _empty(value: Any) -> bool:
    return isinstance(value, Mapping) and not value


def dict_layout(tree: PyTree) -> PyTree:
    """``tree`` with every typed state as the dict that held it before commit 1164ab2 typed
    FedALT's, FedLoRA-Optimizer's and FedGaLore's states: one key per stored field."""

    def as_dict(node: Any) -> Any:
        if not _typed(node):
            return node
        return {key: dict_layout(value) for _, key, value in _stored_fields(node)}

    return jax.tree.map(as_dict, tree, is_leaf=_typed)


def typed_like(restored: PyTree, like: PyTree) -> PyTree:
    """The inverse of ``dict_layout``: ``restored`` (in the dict layout of ``like``) back in
    ``like``'s typed states (a field that was not stored keeps ``like``'s {})."""

    def back(node: Any, saved: Any) -> Any:
        if not _typed(node):
            return saved
        return node.replace(
            **{name: typed_like(saved[key], value) for name, key, value in _stored_fields(node)}
        )

    return jax.tree.map(back, like, restored, is_leaf=_typed)


def _describe(identity: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in identity.items())


def _nbytes(tree: PyTree) -> int:
    """Array bytes of ``tree``, without copying device arrays to the host."""
    return sum(
        int(getattr(x, "nbytes", None) or np.asarray(x).nbytes) for x in jax.tree.leaves(tree)
    )


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _reason(e: BaseException) -> str:
    """The OS reason inside an orbax/tensorstore error, else its gist (see ``_brief``)."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror} (errno {e.errno})"
    m = _OS_ERROR.search(str(e))
    return f"{os.strerror(int(m.group(1)))} (errno {m.group(1)})" if m else _brief(e)


def _brief(e: BaseException) -> str:
    """The last two clauses of an orbax/tensorstore message's first line (the innermost cause,
    e.g. the file and byte range), without tensorstore's JSON spec."""
    line = (str(e).splitlines() or [type(e).__name__])[0].split(" [tensorstore_spec")[0]
    return ": ".join(line.split(": ")[-2:]).split(". ")[0]


def _is_complete(step_dir: pathlib.Path) -> bool:
    return all((step_dir / m).exists() for m in _FINAL_MARKERS) and all(
        (step_dir / item).is_dir() for item in _ITEMS
    )


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _storable(tree: PyTree) -> PyTree:
    """Typed PRNG keys become their raw key data; numpy/python scalars become arrays."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else jnp.asarray(x), tree)


def _host_value(x: Any) -> bool:
    """A value this process holds by itself in a multi-process run (see the module docstring)."""
    return jax.process_count() > 1 and (not isinstance(x, jax.Array) or x.is_fully_addressable)


def _replicated() -> NamedSharding:
    """Every device of every process holds the whole value."""
    return NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)), P())


def _shared(tree: PyTree, what: str) -> PyTree:
    """Host-local leaves as replicated global arrays (orbax refuses host-local arrays in a
    multi-process save), after checking that every process holds the same values."""
    hosts = [np.asarray(x) for x in jax.tree.leaves(tree) if _host_value(x)]
    if not hosts:
        return tree
    digest = hashlib.sha256()
    for x in hosts:
        digest.update(f"{x.dtype}{x.shape}".encode())
        digest.update(np.ascontiguousarray(x).tobytes())
    differ = distributed.differing_processes(digest.hexdigest())
    if differ:
        raise CheckpointError(
            f"{what}: process(es) {differ} hold other host-local values (PRNG key, round, "
            "numpy leaves) than process 0; a multi-process checkpoint needs them equal"
        )
    rep = _replicated()
    return jax.tree.map(lambda x: distributed.to_global(x, rep) if _host_value(x) else x, tree)


def _restore_target(x: Any) -> Any:
    """Where a leaf is restored: a host-local leaf of a multi-process run as a replicated global
    array (``_back_to_host`` makes it local again), any other leaf as ``x`` says."""
    if not _host_value(x):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_replicated())  # x: a jax array


def _back_to_host(r: Any, target: Any) -> Any:
    if isinstance(target, jax.ShapeDtypeStruct):  # every process holds the whole value
        return jnp.asarray(np.asarray(r))
    return r


def _like(restored: PyTree, like: PyTree) -> PyTree:
    """Re-wrap raw key data where ``like`` holds typed keys; numpy and Python scalar leaves (e.g.
    the engine's round counter) come back as their own type. Orbax returns arrays committed to a
    device; where ``like`` is uncommitted the restored leaf is too, because jit caches on
    commitment and would otherwise compile the round function again after a resume."""

    def back(r: Any, x: Any) -> Any:
        if _is_key(x):
            return jax.random.wrap_key_data(_uncommitted(r, x), impl=jax.random.key_impl(x))
        if isinstance(x, np.ndarray | np.generic):
            return np.asarray(r, dtype=x.dtype)
        if isinstance(x, bool | int | float):
            return type(x)(r)
        return _uncommitted(r, x)

    return jax.tree.map(back, restored, like)


def _uncommitted(r: Any, like: Any) -> Any:
    if isinstance(like, jax.Array) and not like.committed and getattr(r, "committed", False):
        return jnp.asarray(np.asarray(r))
    return r


@dataclasses.dataclass(frozen=True)
class CheckpointSettings(Section):
    """The ``checkpoint`` section of a run config."""

    section = "checkpoint"
    every: int = setting(1, "save every this many rounds (and the last); 0 = never", low=0)
    keep: int = setting(2, "checkpoints kept (the newest)", low=1)
