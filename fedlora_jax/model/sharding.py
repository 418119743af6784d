"""Partition rules: which mesh axes each base-weight leaf is split over.

A rule is ``(regex, spec)``: the regex is matched (``re.fullmatch``) against the leaf's path
(``"layers/attn/q_proj"``, docs/internals.md), the first matching rule wins, and ``spec`` names a
mesh axis (or ``None``) per array dimension, as a ``PartitionSpec`` does. ``DEFAULT_RULES`` is
FSDP in the MaxText style: every matrix splits its model dimension ``d`` over ``fsdp`` and its
heads / FFN / vocabulary dimension over ``tensor`` (Megatron's column/row split); the stacked
layer axis is never split (the forward scans it). The embedding splits ``d`` like every other
matrix (MaxText's choice too). Pass your own rules to override, e.g.
``((r"lm_head", ("fsdp", None)),) + DEFAULT_RULES`` keeps the vocabulary whole.

Checks, so nothing is replicated by accident:

- every leaf must match a rule (a leaf that matches none is an error naming it);
- a rule whose spec splits nothing (all ``None``) may only hit leaves up to
  ``replicate_limit_bytes``; a larger leaf needs the explicit ``REPLICATE`` spec;
- a split dimension must divide by the product of its axes' sizes.

Axes the mesh does not have (``tensor`` on a ``clients x fsdp`` mesh) are dropped from a spec:
the rules are written once for the full ``clients x fsdp x tensor`` mesh.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any
AxisSpec = str | tuple[str, ...] | None
Rule = tuple[str, "tuple[AxisSpec, ...] | str"]

FSDP, TENSOR = "fsdp", "tensor"
REPLICATE = "replicate"  # a rule's spec that replicates a leaf of any size, on purpose

DEFAULT_RULES: tuple[Rule, ...] = (
    (r"embed", (TENSOR, FSDP)),  # [V, d]: vocabulary over tensor, d over fsdp
    (r"lm_head", (FSDP, TENSOR)),  # [d, V]
    (r"layers/attn/(q|k|v)_proj", (None, FSDP, TENSOR)),  # [L, d, heads*hd]: column split
    (r"layers/attn/o_proj", (None, TENSOR, FSDP)),  # [L, heads*hd, d]: row split
    (r"layers/mlp/(gate|up)_proj", (None, FSDP, TENSOR)),  # [L, d, f]
    (r"layers/mlp/down_proj", (None, TENSOR, FSDP)),  # [L, f, d]
    (r"layers/(input|post_attn)_norm", REPLICATE),  # [L, d]: 1.3 MB at 70B (bf16), replicated
    (r"norm", REPLICATE),  # [d]
)
REPLICATE_LIMIT_BYTES = 1 << 20  # 1 MiB: replicating more than that takes an explicit REPLICATE


class ShardingError(ValueError):
    """A leaf has no rule, a rule does not fit its leaf, or a large leaf would be replicated."""


def leaf_paths(tree: PyTree) -> dict[str, Any]:
    """``{"layers/attn/q_proj": leaf, ...}`` for a nested-dict pytree."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else str(k))
        else:
            out[prefix] = node

    walk(tree, "")
    return out


def _nbytes(leaf: Any) -> int:
    return math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize


def leaf_spec(
    path: str,
    leaf: Any,
    mesh_shape: Mapping[str, int],
    rules: Sequence[Rule] = DEFAULT_RULES,
    replicate_limit_bytes: int = REPLICATE_LIMIT_BYTES,
) -> P:
    """The PartitionSpec of one leaf (shape/dtype only are read) on a mesh of ``mesh_shape``."""
    rule = next(((rx, spec) for rx, spec in rules if re.fullmatch(rx, path)), None)
    if rule is None:
        raise ShardingError(
            f"base leaf {path!r} {list(leaf.shape)} matches no partition rule; add a rule "
            f"(regex, spec) for it (rules: {[rx for rx, _ in rules]})"
        )
    rx, spec = rule
    if spec == REPLICATE:
        return P()
    if len(spec) != len(leaf.shape):
        raise ShardingError(
            f"partition rule {rx!r} gives {len(spec)} axes {spec} but base leaf {path!r} has "
            f"{len(leaf.shape)} dims {list(leaf.shape)}"
        )
    dims: list[AxisSpec] = []
    for size, axes in zip(leaf.shape, spec, strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        names = tuple(a for a in names if a in mesh_shape)
        ways = math.prod(mesh_shape[a] for a in names)
        if size % ways:
            raise ShardingError(
                f"base leaf {path!r} {list(leaf.shape)}: dim of size {size} does not divide over "
                f"mesh axes {names} ({ways} ways; rule {rx!r})"
            )
        dims.append(None if not names else names[0] if len(names) == 1 else names)
    if all(d is None for d in dims) and _nbytes(leaf) > replicate_limit_bytes:
        raise ShardingError(
            f"base leaf {path!r} {list(leaf.shape)} ({_nbytes(leaf)} bytes) would be replicated "
            f"on every device by rule {rx!r}; split it or give it the spec {REPLICATE!r} "
            f"(limit {replicate_limit_bytes} bytes)"
        )
    return P(*dims)


def partition_specs(
    tree: PyTree,
    mesh_shape: Mapping[str, int],
    rules: Sequence[Rule] = DEFAULT_RULES,
    replicate_limit_bytes: int = REPLICATE_LIMIT_BYTES,
) -> PyTree:
    """The same nested dict with a PartitionSpec per leaf (arrays or ShapeDtypeStructs)."""
    specs = {
        path: leaf_spec(path, leaf, mesh_shape, rules, replicate_limit_bytes)
        for path, leaf in leaf_paths(tree).items()
    }
    return unflatten_paths(specs)


def shardings(
    tree: PyTree,
    mesh: Mesh,
    rules: Sequence[Rule] = DEFAULT_RULES,
    replicate_limit_bytes: int = REPLICATE_LIMIT_BYTES,
) -> PyTree:
    """A NamedSharding per leaf of ``tree`` on ``mesh`` (axes absent from the mesh dropped)."""
    specs = partition_specs(tree, dict(mesh.shape), rules, replicate_limit_bytes)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def unflatten_paths(flat: Mapping[str, Any]) -> PyTree:
    """Inverse of ``leaf_paths``."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    return out
