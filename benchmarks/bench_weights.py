"""Deterministic random LLaMA weights in numpy, shared by the JAX and the torch benchmark cells.

Both sides rebuild the SAME base from (HF config dict, seed) without importing each other's
framework, one leaf at a time (peak host memory ≈ the largest stacked leaf, not a second model).
Leaves are in our base layout (``docs/internals.md``): linears ``[L, in, out]``. Values are
uniform with std 0.02 (uniform is several times cheaper to draw than normal; a 7B base is 6.7e9
draws), norms are ones.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np

STD = 0.02


def leaf_shapes(hf: dict[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Path in the base pytree -> shape, for a HF ``config.json`` dict (``to_hf_dict`` output)."""
    L, d, f = hf["num_hidden_layers"], hf["hidden_size"], hf["intermediate_size"]
    hd = hf.get("head_dim") or d // hf["num_attention_heads"]
    dq = hf["num_attention_heads"] * hd
    dkv = (hf.get("num_key_value_heads") or hf["num_attention_heads"]) * hd
    shapes = {
        ("embed",): (hf["vocab_size"], d),
        ("norm",): (d,),
        ("layers", "input_norm"): (L, d),
        ("layers", "post_attn_norm"): (L, d),
        ("layers", "attn", "q_proj"): (L, d, dq),
        ("layers", "attn", "k_proj"): (L, d, dkv),
        ("layers", "attn", "v_proj"): (L, d, dkv),
        ("layers", "attn", "o_proj"): (L, dq, d),
        ("layers", "mlp", "gate_proj"): (L, d, f),
        ("layers", "mlp", "up_proj"): (L, d, f),
        ("layers", "mlp", "down_proj"): (L, f, d),
    }
    if not hf.get("tie_word_embeddings", False):
        shapes[("lm_head",)] = (d, hf["vocab_size"])
    return shapes


def random_leaves(hf: dict[str, Any], seed: int) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Yield (path, float32 array) per base leaf; each leaf is seeded by (seed, path) alone."""
    for path, shape in leaf_shapes(hf).items():
        if path[-1].endswith("norm"):
            yield path, np.ones(shape, np.float32)
            continue
        rng = np.random.default_rng([seed, zlib.crc32("/".join(path).encode())])
        bound = np.float32(STD * np.sqrt(3.0))
        x = rng.random(shape, dtype=np.float32)
        x *= 2 * bound
        x -= bound
        yield path, x


def nest(leaves: Iterator[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    """Paths -> nested dict (the base pytree)."""
    tree: dict[str, Any] = {}
    for path, value in leaves:
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree
