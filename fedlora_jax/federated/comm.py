"""Communication accounting from the actual pytrees sent (shapes and dtypes; no device sync).

With heterogeneous client ranks (``algorithms.rank_mask``) every client holds r_max-sized LoRA
factors but sends only its own rank's components: the clients then report, per factor, the rank
they received and sent (metrics ``down_rank/A`` ... ``up_rank/B``), and each client's bytes
count A [r, in] and B [out, r] at that rank (0 = the factor was not sent); the mean over the
sampled clients is reported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

PyTree = Any

RANK_AXES = {"A": 0, "B": 1}  # LoRA factors' rank axis (one client's row)


def tree_nbytes(tree: PyTree) -> int:
    """Bytes of every array leaf (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def per_client_nbytes(stacked: PyTree) -> int:
    """Bytes of ONE client's row of a tree whose leaves carry a leading client axis."""
    return sum(math.prod(x.shape[1:]) * x.dtype.itemsize for x in jax.tree.leaves(stacked))


def ranked_nbytes(row: PyTree, ranks: Mapping[str, np.ndarray]) -> np.ndarray:
    """[K] bytes of one client's ``row`` (shapes without a client axis) when client k sends
    ``ranks[key][k]`` components of each factor ``key`` in RANK_AXES (other arrays whole)."""
    k = len(next(iter(ranks.values())))
    total = np.zeros(k, np.float64)
    for path, x in jax.tree_util.tree_leaves_with_path(row):
        key = getattr(path[-1], "key", None)
        size = math.prod(x.shape) * x.dtype.itemsize
        if key in RANK_AXES and key in ranks:
            total += size // x.shape[RANK_AXES[key]] * np.asarray(ranks[key], np.float64)
        else:
            total += size
    return total


def _row(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), tree)


def _ranks(metrics: Mapping[str, Any] | None, prefix: str) -> dict[str, np.ndarray]:
    if not metrics:
        return {}
    found = {k: metrics.get(f"{prefix}_rank/{k}") for k in RANK_AXES}
    return {k: np.asarray(v) for k, v in found.items() if v is not None}


def first_download_share(ids: Any, holders: Any) -> float:
    """The share of this round's clients ``ids`` that do not already hold a payload the
    clients ``holders`` received (``Phase.payload_held``: the previous round's clients)."""
    held = {int(i) for i in holders}
    ids = [int(i) for i in ids]
    return sum(i not in held for i in ids) / len(ids) if ids else 0.0


def phase_bytes(
    payload: PyTree,
    uploads: PyTree,
    per_client_broadcast: bool,
    aggregates: bool,
    client_metrics: Mapping[str, Any] | None = None,
) -> tuple[float, float]:
    """(down, up) bytes for one client in one phase (the mean over the sampled clients when
    they report ranks in ``client_metrics``, the phase's per-client metrics).

    down: the broadcast payload, or this client's slice of a per-client payload. up: one client's
    upload row, counted only when the phase aggregates (otherwise nothing leaves the client).
    """
    down_ranks, up_ranks = _ranks(client_metrics, "down"), _ranks(client_metrics, "up")
    if down_ranks:
        row = _row(payload) if per_client_broadcast else payload
        down = float(ranked_nbytes(row, down_ranks).mean())
    else:
        down = per_client_nbytes(payload) if per_client_broadcast else tree_nbytes(payload)
    if not aggregates:
        return down, 0
    up = float(ranked_nbytes(_row(uploads), up_ranks).mean()) if up_ranks else None
    return down, per_client_nbytes(uploads) if up is None else up
