"""Kind ``dual`` (FedDPA): a global LoRA and a local LoRA per module, mixed by a weight ``mix``.

Leaf: ``A [r,in], B [out,r]`` (the global adapter), ``A_l [r,in], B_l [out,r]`` (the local
adapter) and ``mix`` (the global adapter's weight: a scalar, or ``[batch, 1, 1]`` for one weight
per example). Output, as FedDPA's released code (``Lydia-yang/FedDPA``, its modified PEFT
``tuners/lora/layer.py``) combines the active and the other adapter::

    y = mix·s·B A drop(x) + (1 − mix)·s·B_l A_l drop(x)     # ONE dropout sample for both

``mix`` = 1 is the global adapter alone and 0 the local one alone, exactly (0·finite = 0).

Instance-wise dynamic weighting (the paper's test-time mechanism) is this kind's ``condition``:
the eval harness (``eval.harness``) calls it on every batch of prompts to set ``mix`` per example
from the tree's ``anchors`` (top-level key ``ANCHORS``: representations of the client's training
instances, ``{"h": [n, d], "valid": [n], "max_weight": []}``)::

    e(x) = final-normed hidden state of the prompt's last token, local adapter alone (mix = 0)
    α(x) = w · (1/|valid|) Σ_j cos(e(x), a_j)        mix = α(x)

A tree without anchors (a global model) passes through unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fedlora_jax.adapters.base import AdapterConfig, AdapterKind, Array, Leaf, register_kind
from fedlora_jax.adapters.lora import delta_weight as lora_delta
from fedlora_jax.adapters.lora import dropout, kaiming_uniform, low_rank
from fedlora_jax.model.config import LlamaConfig
from fedlora_jax.model.llama import hidden

ANCHORS = "anchors"  # top-level key of a personal tree: the dynamic weight's anchors
MIX = "mix"
GLOBAL_KEYS = ("A", "B")
LOCAL_KEYS = ("A_l", "B_l")
COS_EPS = 1e-8  # torch.cosine_similarity's eps, which the released code calls


def init(key: Array, in_features: int, out_features: int, cfg: AdapterConfig) -> Leaf:
    """Both LoRAs as PEFT inits them (A Kaiming-uniform, B = 0, own keys); ``mix`` 0.5, the
    released code's fixed weight when the dynamic weighting is off."""
    k_g, k_l = jax.random.split(key)
    zeros_b = jnp.zeros((out_features, cfg.r), jnp.float32)
    return {
        "A": kaiming_uniform(k_g, (cfg.r, in_features), in_features),
        "B": zeros_b,
        "A_l": kaiming_uniform(k_l, (cfg.r, in_features), in_features),
        "B_l": zeros_b,
        MIX: jnp.float32(0.5),
    }


def _mix(leaf: Leaf) -> Array:
    if MIX not in leaf:
        raise ValueError(
            "adapter.kind='dual': a leaf needs 'mix' (the global adapter's weight); the eval "
            "harness sets it per example (adapters.dual.condition), or give it explicitly"
        )
    return leaf[MIX]


def apply(leaf: Leaf, x: Array, cfg: AdapterConfig, dropout_key: Array | None) -> Array:
    mix = _mix(leaf).astype(x.dtype)
    xd = dropout(x, cfg.dropout, dropout_key)
    global_ = low_rank(xd, leaf["A"], leaf["B"], cfg.scale)
    local = low_rank(xd, leaf["A_l"], leaf["B_l"], cfg.scale)
    return mix * global_ + (1 - mix) * local


def delta_weight(leaf: Leaf, cfg: AdapterConfig) -> Array:
    """mix·ΔW_g + (1 − mix)·ΔW_l for a scalar ``mix`` (a per-example one has no single ΔW)."""
    mix = _mix(leaf)
    if jnp.ndim(mix) != 0:
        raise ValueError(
            "adapter.kind='dual': a per-example mix has no single ΔW; run the forward instead"
        )
    g = lora_delta({"A": leaf["A"], "B": leaf["B"]}, cfg)
    loc = lora_delta({"A": leaf["A_l"], "B": leaf["B_l"]}, cfg)
    return mix * g + (1 - mix) * loc


# ----------------------------------------------------------------------------- dynamic weight


def with_mix(tree: dict[str, Any], mix: Array | float) -> dict[str, Any]:
    """The same module tree with ``mix`` set in every leaf."""
    if any(hasattr(v, "shape") for v in tree.values()):
        return {**tree, MIX: jnp.asarray(mix, jnp.float32)}
    return {name: with_mix(sub, mix) for name, sub in tree.items()}


def cosine(x: Array, y: Array) -> Array:
    """[b, m] cosine similarities of rows x [b, d] and y [m, d]: x·y / max(‖x‖‖y‖, eps)."""
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    norms = jnp.linalg.norm(x, axis=-1)[:, None] * jnp.linalg.norm(y, axis=-1)[None, :]
    return (x @ y.T) / jnp.maximum(norms, COS_EPS)


def dynamic_weight(h: Array, anchors: dict[str, Array]) -> Array:
    """α [b] = w · mean over the valid anchors j of cos(h_b, a_j); 0 without a valid anchor."""
    valid = jnp.asarray(anchors["valid"], jnp.float32)
    sims = cosine(h, anchors["h"]) * valid[None, :]
    mean = jnp.sum(sims, axis=-1) / jnp.maximum(jnp.sum(valid), 1.0)
    return jnp.asarray(anchors["max_weight"], jnp.float32) * mean


def condition(
    base: Any,
    adapters: dict[str, Any],
    prompt_tokens: Array,
    prompt_mask: Array,
    *,
    cfg: LlamaConfig,
    adapter_cfg: AdapterConfig,
    compute_dtype: Any,
) -> dict[str, Any]:
    """The adapters for one batch of left-padded prompts [b, P]: ``mix`` = α(x) per example,
    anchors removed. A tree without anchors is returned as it is."""
    if ANCHORS not in adapters:
        return adapters
    tree = {k: v for k, v in adapters.items() if k != ANCHORS}
    h = hidden(
        base,
        with_mix(tree, 0.0),
        prompt_tokens,
        prompt_mask,
        cfg=cfg,
        adapter_cfg=adapter_cfg,
        compute_dtype=compute_dtype,
    )[:, -1]
    alpha = dynamic_weight(h, adapters[ANCHORS])
    return with_mix(tree, alpha[:, None, None])


@dataclasses.dataclass(frozen=True)
class ConditionedKind(AdapterKind):
    """A kind whose adapters are set per example before a forward (``condition`` above)."""

    condition: Callable[..., dict[str, Any]] | None = None


KIND = register_kind(
    ConditionedKind(
        name="dual", init=init, apply=apply, delta_weight=delta_weight, condition=condition
    )
)
