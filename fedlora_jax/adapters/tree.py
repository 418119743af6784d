"""Functions over whole adapter trees: init, materialise, merge into the base, count, label.

A tree is ``{"layers": {"3": {"attn": {"q_proj": leaf}}}}``; a *leaf* is the kind's dict of
arrays. Everything here is pure: inputs are never mutated.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from fedlora_jax.adapters.base import (
    BASE_DELTA,
    AdapterConfig,
    Array,
    Leaf,
    get_kind,
    get_path,
    select_targets,
    set_path,
)
from fedlora_jax.model.config import LlamaConfig, linear_specs, module_paths

Tree = dict[str, Any]
LabelRule = Mapping[str, str] | Callable[[str, str], str]


def module_key(key: Array, path: str) -> Array:
    """Per-module key from the path alone, so a module's init ignores which others are targeted."""
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def init_adapters(key: Array, model_cfg: LlamaConfig, adapter_cfg: AdapterConfig) -> Tree:
    """A fresh adapter tree over ``select_targets``; the same seed gives the same leaves."""
    kind = get_kind(adapter_cfg.kind)
    specs = linear_specs(model_cfg)
    tree: Tree = {}
    for path in select_targets(model_cfg.num_layers, adapter_cfg):
        n_in, n_out = specs[path]
        set_path(tree, path, kind.init(module_key(key, path), n_in, n_out, adapter_cfg))
    return tree


def _is_leaf(node: Any) -> bool:
    """A module's leaf: a non-empty dict whose values are arrays, not further dicts."""
    if not isinstance(node, dict) or not node:
        return False
    return not any(isinstance(v, dict) for v in node.values())


def _walk(node: Any, prefix: str) -> Iterator[str]:
    if _is_leaf(node):
        yield prefix
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else k)


_MODULE_ORDER = {p.split(".", 2)[2]: j for j, p in enumerate(module_paths(1))}


def _model_order(path: str) -> tuple[int, int]:
    """(layer, position of the module inside the layer): q, k, v, o, gate, up, down."""
    _, i, module = path.split(".", 2)
    return int(i), _MODULE_ORDER[module]


def leaf_paths(tree: Tree) -> list[str]:
    """Dotted module paths that hold an adapter leaf, in model order.

    Model order, not dict order: ``jax.tree.map`` sorts dict keys (so "10" before "2"), and
    exports and reports should not depend on which function built the tree last.
    """
    paths = list(_walk(tree, ""))
    for path in paths:
        layers, i, module = ([*path.split(".", 2), "", ""])[:3]
        if layers != "layers" or not i.isdigit() or module not in _MODULE_ORDER:
            raise ValueError(
                f"adapter path {path!r} is not of the form layers.<i>.attn.(q|k|v|o)_proj or "
                "layers.<i>.mlp.(gate|up|down)_proj"
            )
    return sorted(paths, key=_model_order)


def _map_leaves(fn: Callable[[str, Leaf], Any], tree: Tree) -> Tree:
    out: Tree = {}
    for path in leaf_paths(tree):
        set_path(out, path, fn(path, get_path(tree, path)))
    return out


def materialize(tree: Tree, cfg: AdapterConfig) -> Tree:
    """The same tree with each leaf replaced by its LoRA factors ``{"A", "B"}``."""
    kind = get_kind(cfg.kind)
    if kind.factors is None:
        raise ValueError(
            f"adapter.kind={cfg.kind!r} has no (A, B) factor form; materialize supports "
            "lora and decomposed"
        )
    return _map_leaves(lambda _, leaf: kind.factors(leaf, cfg), tree)


def merge_into_base(base: Tree, tree: Tree, cfg: AdapterConfig) -> Tree:
    """base' with W0 + ΔW at every adapted module (stacked layout ``layers/attn/q_proj[i]``)."""
    kind = get_kind(cfg.kind)
    updates: dict[tuple[str, str], list[tuple[int, Array]]] = {}
    for path in leaf_paths(tree):
        _, i, group, name = path.split(".")
        leaf = get_path(tree, path)
        dw = kind.delta_weight(leaf, cfg)
        if BASE_DELTA in leaf:  # a server-owned change to the base (FedEx-LoRA, FLoRA)
            dw = dw + leaf[BASE_DELTA]
        updates.setdefault((group, name), []).append((int(i), dw))
    layers = {g: dict(v) if isinstance(v, dict) else v for g, v in base["layers"].items()}
    for (group, name), items in updates.items():
        W = jnp.asarray(layers[group][name])
        idx = [i for i, _ in items]
        delta = jnp.stack([dw for _, dw in items])
        if max(idx) >= W.shape[0] or delta.shape[1:] != W.shape[1:]:
            raise ValueError(
                f"adapter for {group}.{name} has ΔW {delta.shape[1:]} at layers {idx}; the base "
                f"weight is {W.shape} (layers, in, out)"
            )
        layers[group][name] = W.at[jnp.asarray(idx)].add(delta.astype(W.dtype))
    return {**base, "layers": layers}


def count_params(tree: Tree) -> int:
    """Number of scalars in the tree (communication and trainable-size reports)."""
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def label_tree(tree: Tree, rule: LabelRule) -> Tree:
    """A tree of label strings for ``optax.partition``: one label per array.

    ``rule`` is a mapping from the leaf key (``"A"``, ``"B_M"``, ``"G"`` ...) to a label, or a
    function ``(module_path, key) -> label`` for per-module routing.
    """

    def label(path: str, key: str) -> str:
        if callable(rule):
            return rule(path, key)
        if key not in rule:
            raise ValueError(
                f"label rule has no entry for adapter key {key!r} (at {path}); "
                f"rule keys: {', '.join(sorted(rule))}"
            )
        return rule[key]

    return _map_leaves(lambda path, leaf: {k: label(path, k) for k in leaf}, tree)
