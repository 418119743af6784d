"""Adapter kinds as pure pytrees + functions; importing the package registers every kind."""

from fedlora_jax.adapters import decomposed, dense_delta, dual, lora, mixture  # noqa: F401 (register)
from fedlora_jax.adapters.base import AdapterConfig, get_kind, select_targets
from fedlora_jax.adapters.decomposed import decompose, recompose
from fedlora_jax.adapters.mixture import mixer_weights
from fedlora_jax.adapters.tree import (
    count_params,
    init_adapters,
    label_tree,
    leaf_paths,
    materialize,
    merge_into_base,
)

__all__ = [
    "AdapterConfig",
    "count_params",
    "decompose",
    "get_kind",
    "init_adapters",
    "label_tree",
    "leaf_paths",
    "materialize",
    "merge_into_base",
    "mixer_weights",
    "recompose",
    "select_targets",
]
