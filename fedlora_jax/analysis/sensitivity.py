"""Magnitude/direction sensitivity of LoRA factors across tasks (FedLoRA-Optimizer paper, Fig. 1).

Inputs are decomposed leaves ``{A_M, A_D, B_M, B_D}`` (the layout of the ``decomposed`` adapter,
``fedlora_jax/adapters/decomposed.py``), one adapter tree per task, all trained from ONE shared
init. Per module, averaged over every task pair i < j:

- ``dir_X``: mean over the direction vectors (rows of X_D row-wise, columns col-wise) of
  ``1 - cos(X_D_i, X_D_j)``;
- ``mag_X``: mean over entries of ``|X_M_i - X_M_j|`` (absolute magnitude change);
- ``rel_mag_X``: ``mean |X_M_i - X_M_j| / mean (|X_M_i| + |X_M_j|) / 2`` (relative: free of the
  component's scale, which the absolute change mostly measures when one factor starts at 0).

How the leaves are obtained is the *protocol* (``protocol_leaves``): ``lora`` trains standard
LoRA (PEFT init) and splits A and B into norms and directions after training; ``decomposed``
takes the learned parameters of the decomposed adapter (B_M starts at 0). The paper reports
direction A / direction B ≈ 1.7 and magnitude B / magnitude A ≈ 41 (LLaMA2-7B, Dolly);
``agreement`` and ``verdict`` say whether a measured ratio is near those.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from fedlora_jax.adapters.base import AdapterConfig, get_path, set_path
from fedlora_jax.adapters.decomposed import decompose
from fedlora_jax.adapters.tree import leaf_paths

METRICS = ("dir_A", "dir_B", "mag_A", "mag_B", "rel_mag_A", "rel_mag_B")
RATIOS = ("dir_A/dir_B", "mag_B/mag_A", "rel_mag_B/rel_mag_A")
PAPER_RATIOS = {"dir_A/dir_B": 1.7, "mag_B/mag_A": 41.0}
PROTOCOLS = ("lora", "decomposed")
# Post-hoc split of trained LoRA factors: the adapter's ε-norm with ε negligible (the plain norm).
# The adapter's default ε = 1e-6 would floor every row norm at 1e-3, the size of young B rows.
POSTHOC_NORM_EPS = 1e-30
# A measured ratio "reproduces" the paper's when within this factor of it (our choice).
AGREEMENT_FACTOR = 2.0
Leaf = Mapping[str, Any]
Tree = Mapping[str, Any]


def direction_change(D1: Any, D2: Any, axis: int) -> float:
    """Mean over the vectors along ``axis`` (1: rows, 0: columns) of 1 - cos(D1, D2)."""
    D1, D2 = jnp.asarray(D1, jnp.float32), jnp.asarray(D2, jnp.float32)
    dot = jnp.sum(D1 * D2, axis=axis)
    norms = jnp.linalg.norm(D1, axis=axis) * jnp.linalg.norm(D2, axis=axis)
    return float(jnp.mean(1.0 - dot / norms))


def magnitude_change(M1: Any, M2: Any) -> float:
    """Mean absolute difference of two magnitude vectors."""
    return float(jnp.mean(jnp.abs(jnp.asarray(M1, jnp.float32) - jnp.asarray(M2, jnp.float32))))


def relative_magnitude_change(M1: Any, M2: Any) -> float:
    """Mean |M1 - M2| over the mean of (|M1| + |M2|) / 2 (0 when both are all zero)."""
    M1, M2 = jnp.asarray(M1, jnp.float32), jnp.asarray(M2, jnp.float32)
    scale = float(jnp.mean(jnp.abs(M1) + jnp.abs(M2)) / 2)
    return magnitude_change(M1, M2) / scale if scale > 0 else 0.0


def module_sensitivity(leaves: Sequence[Leaf], norm_axis: str = "row") -> dict[str, float]:
    """The six changes of one module, averaged over every pair of tasks' decomposed leaves."""
    if len(leaves) < 2:
        raise ValueError(f"sensitivity needs adapters from >= 2 tasks, got {len(leaves)}")
    axis = 1 if norm_axis == "row" else 0
    pairs = list(itertools.combinations(leaves, 2))
    sums = dict.fromkeys(METRICS, 0.0)
    for a, b in pairs:
        for x in "AB":
            sums[f"dir_{x}"] += direction_change(a[f"{x}_D"], b[f"{x}_D"], axis)
            sums[f"mag_{x}"] += magnitude_change(a[f"{x}_M"], b[f"{x}_M"])
            sums[f"rel_mag_{x}"] += relative_magnitude_change(a[f"{x}_M"], b[f"{x}_M"])
    return {k: v / len(pairs) for k, v in sums.items()}


def ratios(values: Mapping[str, float]) -> dict[str, float]:
    """dir_A/dir_B, mag_B/mag_A and rel_mag_B/rel_mag_A (the paper's two numbers, and the
    magnitude one on the relative scale)."""

    def div(a: float, b: float) -> float:
        return a / b if b else float("inf")

    return {
        "dir_A/dir_B": div(values["dir_A"], values["dir_B"]),
        "mag_B/mag_A": div(values["mag_B"], values["mag_A"]),
        "rel_mag_B/rel_mag_A": div(values["rel_mag_B"], values["rel_mag_A"]),
    }


def decompose_factors(leaf: Leaf, norm_axis: str) -> dict[str, np.ndarray]:
    """A LoRA leaf {A, B} split after training into the decomposed adapter's (M, D) layout."""
    cfg = AdapterConfig(kind="decomposed", norm_axis=norm_axis, norm_eps=POSTHOC_NORM_EPS)
    parts = decompose(jnp.asarray(leaf["A"], jnp.float32), jnp.asarray(leaf["B"], jnp.float32), cfg)
    return {k: np.asarray(v) for k, v in parts.items()}


def protocol_leaves(tree: Tree, protocol: str, norm_axis: str) -> dict[str, Any]:
    """The decomposed leaves a protocol scores: ``lora`` splits each trained {A, B} leaf,
    ``decomposed`` keeps the learned {A_M, A_D, B_M, B_D}."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} is not known; allowed: {', '.join(PROTOCOLS)}")
    if protocol == "decomposed":
        return dict(tree)
    out: dict[str, Any] = {}
    for path in leaf_paths(dict(tree)):
        set_path(out, path, decompose_factors(get_path(dict(tree), path), norm_axis))
    return out


def tree_sensitivity(
    trees: Sequence[Tree], norm_axis: str = "row"
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per-module rows ``{"module", "layer", "name", *METRICS}`` (model order) and the mean
    over modules with the three ratios of those means."""
    paths = leaf_paths(dict(trees[0]))
    rows = []
    for path in paths:
        _, layer, name = path.split(".", 2)
        values = module_sensitivity([get_path(dict(t), path) for t in trees], norm_axis)
        rows.append({"module": path, "layer": int(layer), "name": name, **values})
    mean = {k: float(np.mean([r[k] for r in rows])) for k in METRICS}
    return rows, {**mean, **ratios(mean)}


def agreement(measured: float, paper: float, factor: float = AGREEMENT_FACTOR) -> str:
    """``reversed`` when <= 1 (the paper's asymmetry absent or inverted); else ``reproduced``
    within ``factor`` of the paper's ratio, ``same side`` farther from it."""
    if measured <= 1:
        return "reversed"
    return "reproduced" if paper / factor <= measured <= paper * factor else "same side"


def verdict(summary: Mapping[str, float]) -> str:
    """One line: each ratio against the paper's, and whether both numbers are reproduced."""
    d = agreement(summary["dir_A/dir_B"], PAPER_RATIOS["dir_A/dir_B"])
    m_abs = agreement(summary["mag_B/mag_A"], PAPER_RATIOS["mag_B/mag_A"])
    m_rel = agreement(summary["rel_mag_B/rel_mag_A"], PAPER_RATIOS["mag_B/mag_A"])
    both = d == "reproduced" and "reproduced" in (m_abs, m_rel)
    head = "reproduces 1.7 and 41" if both else "does not reproduce 1.7 and 41"
    return f"{head} (dir A/B: {d}; mag B/A abs: {m_abs}; mag B/A rel: {m_rel})"
