"""Communication accounting from the actual pytrees sent (shapes and dtypes; no device sync)."""

from __future__ import annotations

import math
from typing import Any

import jax

PyTree = Any


def tree_nbytes(tree: PyTree) -> int:
    """Bytes of every array leaf (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def per_client_nbytes(stacked: PyTree) -> int:
    """Bytes of ONE client's row of a tree whose leaves carry a leading client axis."""
    return sum(math.prod(x.shape[1:]) * x.dtype.itemsize for x in jax.tree.leaves(stacked))


def first_download_share(ids: Any, holders: Any) -> float:
    """The share of this round's clients ``ids`` that do not already hold a payload the
    clients ``holders`` received (``Phase.payload_held``: the previous round's clients)."""
    held = {int(i) for i in holders}
    ids = [int(i) for i in ids]
    return sum(i not in held for i in ids) / len(ids) if ids else 0.0


def phase_bytes(
    payload: PyTree, uploads: PyTree, per_client_broadcast: bool, aggregates: bool
) -> tuple[int, int]:
    """(down, up) bytes for one client in one phase.

    down: the broadcast payload, or this client's slice of a per-client payload. up: one client's
    upload row, counted only when the phase aggregates (otherwise nothing leaves the client).
    """
    down = per_client_nbytes(payload) if per_client_broadcast else tree_nbytes(payload)
    up = per_client_nbytes(uploads) if aggregates else 0
    return down, up
