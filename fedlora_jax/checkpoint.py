"""Round checkpoints: one orbax step per saved round, holding the whole run state and metadata.

A step has two items: ``state`` (any pytree of arrays: server state, every client's persistent
state, optimizer states, the RNG key; orbax ``StandardSave``) and ``meta`` (JSON: round, metric
history, data-order state). Orbax writes a step into ``<step>.orbax-checkpoint-tmp-*`` and renames
it when complete, so an interrupted save leaves the previous step intact. ``latest_step`` only
trusts steps that orbax finalized (its commit marker and step metadata exist), so a partial step
directory left by a copy or a non-atomic filesystem is skipped, and moved aside on resume.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any

_FINAL_MARKERS = ("_CHECKPOINT_METADATA", "commit_success.txt")
_ITEMS = ("state", "meta")


class Checkpointer:
    """``CheckpointManager`` over ``directory`` keeping the newest ``keep`` complete rounds."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 2) -> None:
        self.directory = pathlib.Path(directory).resolve()
        self._keep = keep
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True)
        return ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

    def save(self, step: int, state: PyTree, meta: dict[str, Any]) -> None:
        """Start saving ``state`` and ``meta`` as ``step`` (asynchronous; see ``wait``)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_storable(state)), meta=ocp.args.JsonSave(meta)
        )
        self._manager.save(step, args=args, force=True)

    def wait(self) -> None:
        """Block until the last save is finalized on disk."""
        self._manager.wait_until_finished()

    def complete_steps(self) -> list[int]:
        """Steps orbax finalized, oldest first."""
        self.wait()
        return sorted(s for s in self._manager.all_steps() if _is_complete(self._step_dir(s)))

    def latest_step(self) -> int | None:
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def restore(self, like: PyTree, step: int | None = None) -> tuple[PyTree, dict[str, Any]]:
        """Restore ``step`` (default: the latest complete one) into the structure of ``like``.

        Incomplete step directories newer than it are renamed ``<step>.incomplete`` so that the
        resumed run can save those rounds again.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint to resume from")
        if step not in self.complete_steps():
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint for round {step}")
        if self._set_aside_incomplete(after=step):
            self._manager.close()
            self._manager = self._open()
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(_storable(like)), meta=ocp.args.JsonRestore()
        )
        out = self._manager.restore(step, args=args)
        return _like(out.state, like), dict(out.meta)

    def close(self) -> None:
        self.wait()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _step_dir(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def _set_aside_incomplete(self, after: int) -> bool:
        moved = False
        for step in self._manager.all_steps():
            path = self._step_dir(step)
            if step > after and path.exists() and not _is_complete(path):
                path.rename(path.with_name(f"{step}.incomplete"))
                moved = True
        return moved


def _is_complete(step_dir: pathlib.Path) -> bool:
    return all((step_dir / m).exists() for m in _FINAL_MARKERS) and all(
        (step_dir / item).is_dir() for item in _ITEMS
    )


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _storable(tree: PyTree) -> PyTree:
    """Typed PRNG keys become their raw key data; numpy/python scalars become arrays."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else jnp.asarray(x), tree)


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
