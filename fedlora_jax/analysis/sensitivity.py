"""Magnitude/direction sensitivity of decomposed LoRA factors across tasks (paper Fig. 1).

Given decomposed adapters trained on different tasks from ONE shared init, measure per module
how far each component moved between tasks:

- direction change of A (B): mean over the direction vectors (rows of A_D / B_D row-wise, columns
  col-wise) of ``1 - cos(d_i, d_j)``;
- magnitude change of A (B): mean over entries of ``|A_M_i - A_M_j|`` (``B_M``);

each averaged over all task pairs i < j. The paper reports direction A / direction B ≈ 1.7 and
magnitude B / magnitude A ≈ 41: A's direction and B's magnitude are the task-sensitive parts.
Magnitudes are the learned (signed) M parameters and directions the learned D parameters, i.e.
the components the method shares or personalises.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from fedlora_jax.adapters.base import get_path
from fedlora_jax.adapters.tree import leaf_paths

METRICS = ("dir_A", "dir_B", "mag_A", "mag_B")
PAPER_RATIOS = {"dir_A/dir_B": 1.7, "mag_B/mag_A": 41.0}
Leaf = Mapping[str, Any]


def direction_change(D1: Any, D2: Any, axis: int) -> float:
    """Mean over the vectors along ``axis`` (1: rows, 0: columns) of 1 - cos(D1, D2)."""
    D1, D2 = jnp.asarray(D1, jnp.float32), jnp.asarray(D2, jnp.float32)
    dot = jnp.sum(D1 * D2, axis=axis)
    norms = jnp.linalg.norm(D1, axis=axis) * jnp.linalg.norm(D2, axis=axis)
    return float(jnp.mean(1.0 - dot / norms))


def magnitude_change(M1: Any, M2: Any) -> float:
    """Mean absolute difference of two magnitude vectors."""
    return float(jnp.mean(jnp.abs(jnp.asarray(M1, jnp.float32) - jnp.asarray(M2, jnp.float32))))


def module_sensitivity(leaves: Sequence[Leaf], norm_axis: str = "row") -> dict[str, float]:
    """The four changes of one module, averaged over every pair of tasks' decomposed leaves."""
    if len(leaves) < 2:
        raise ValueError(f"sensitivity needs adapters from >= 2 tasks, got {len(leaves)}")
    axis = 1 if norm_axis == "row" else 0
    pairs = list(itertools.combinations(leaves, 2))
    sums = dict.fromkeys(METRICS, 0.0)
    for a, b in pairs:
        sums["dir_A"] += direction_change(a["A_D"], b["A_D"], axis)
        sums["dir_B"] += direction_change(a["B_D"], b["B_D"], axis)
        sums["mag_A"] += magnitude_change(a["A_M"], b["A_M"])
        sums["mag_B"] += magnitude_change(a["B_M"], b["B_M"])
    return {k: v / len(pairs) for k, v in sums.items()}


def ratios(values: Mapping[str, float]) -> dict[str, float]:
    """dir_A/dir_B and mag_B/mag_A (the paper's two headline numbers)."""

    def div(a: float, b: float) -> float:
        return a / b if b else float("inf")

    return {
        "dir_A/dir_B": div(values["dir_A"], values["dir_B"]),
        "mag_B/mag_A": div(values["mag_B"], values["mag_A"]),
    }


def tree_sensitivity(
    trees: Sequence[Mapping[str, Any]], norm_axis: str = "row"
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per-module rows ``{"module", "layer", "name", dir_A, dir_B, mag_A, mag_B}`` (model order)
    and the mean over modules with the two ratios of those means."""
    paths = leaf_paths(dict(trees[0]))
    rows = []
    for path in paths:
        _, layer, name = path.split(".", 2)
        values = module_sensitivity([get_path(dict(t), path) for t in trees], norm_axis)
        rows.append({"module": path, "layer": int(layer), "name": name, **values})
    mean = {k: float(np.mean([r[k] for r in rows])) for k in METRICS}
    return rows, {**mean, **ratios(mean)}
