"""Batched generation with a KV cache: one prefill of the left-padded prompts, then a
``lax.while_loop`` of one-token steps that stops when every row has emitted EOS.

The jitted function is module-level with the configuration as static arguments, so jax caches one
compilation per (config, prompt shape); the eval harness can call ``generate`` for many batches
of the same padded shape without recompiling (``left_pad(..., multiple=k)`` buckets lengths).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax.model.config import LlamaConfig
from fedlora_jax.model.llama import AdapterSpec, apply_with_cache, init_cache

Array = jax.Array
PyTree = Any


def left_pad(
    seqs: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token-id lists to one length (rounded up to ``multiple``, to bound recompiles).

    Returns (tokens [B, P] int32, mask [B, P] int32 with 1 on real tokens).
    """
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("left_pad: every prompt needs at least one token (e.g. BOS)")
    longest = max(len(s) for s in seqs)
    width = -(-longest // multiple) * multiple
    tokens = np.full((len(seqs), width), pad_id, np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, width - len(s) :] = s
        mask[i, width - len(s) :] = 1
    return tokens, mask


def top_p_filter(logits: Array, top_p: float) -> Array:
    """Set logits outside the nucleus to -inf: keep a token iff the probability mass of the tokens
    ranked above it is < top_p (HF's TopPLogitsWarper, so the top token is always kept)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    order = jnp.argsort(-probs, axis=-1)
    sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
    mass_above = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_above < top_p
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(keep, logits, -jnp.inf)


def _select(logits: Array, key: Array, temperature: float, top_p: float) -> Array:
    """Next token [B] from logits [B, V]: argmax when temperature == 0, else nucleus sampling."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


_STATIC = (
    "cfg",
    "adapter_cfg",
    "max_new_tokens",
    "eos_ids",
    "temperature",
    "top_p",
    "compute_dtype",
    "pad_id",
)


def _generate_core(
    base: PyTree,
    adapters: PyTree | None,
    prompt_tokens: Array,
    prompt_mask: Array,
    key: Array,
    *,
    cfg: LlamaConfig,
    adapter_cfg: AdapterSpec | None,
    max_new_tokens: int,
    eos_ids: tuple[int, ...],
    temperature: float,
    top_p: float,
    compute_dtype: np.dtype,
    pad_id: int,
) -> tuple[Array, Array]:
    b, p = prompt_tokens.shape
    n = max_new_tokens
    eos = jnp.asarray(eos_ids, jnp.int32)

    def is_eos(tok: Array) -> Array:
        return jnp.isin(tok, eos) if eos_ids else jnp.zeros(tok.shape, bool)

    def forward(tokens: Array, mask: Array, cache: dict) -> tuple[Array, dict]:
        logits, cache = apply_with_cache(
            base,
            adapters,
            tokens,
            mask,
            cache,
            cfg=cfg,
            adapter_cfg=adapter_cfg,
            compute_dtype=compute_dtype,
        )
        return logits[:, -1], cache

    cache = init_cache(cfg, b, p + n, compute_dtype)
    logits, cache = forward(prompt_tokens, prompt_mask, cache)
    first = _select(logits, jax.random.fold_in(key, 0), temperature, top_p)
    out = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(first)

    def cond(state: tuple) -> Array:
        i, _, _, done = state
        return (i < n) & ~jnp.all(done)

    def body(state: tuple) -> tuple:
        i, cache, out, done = state
        last = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)
        logits, cache = forward(last, jnp.ones_like(last), cache)
        tok = _select(logits, jax.random.fold_in(key, i), temperature, top_p)
        tok = jnp.where(done, pad_id, tok)
        out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], i, axis=1)
        return i + 1, cache, out, done | is_eos(tok)

    _, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, out, is_eos(first)))
    hits = is_eos(out)
    lengths = jnp.where(jnp.any(hits, axis=1), jnp.argmax(hits, axis=1) + 1, n)
    return out, lengths.astype(jnp.int32)


_generate_jit = jax.jit(_generate_core, static_argnames=_STATIC)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate_stacked_jit(
    base: PyTree,
    adapters: PyTree,
    prompt_tokens: Array,
    prompt_mask: Array,
    key: Array,
    **static: Any,
) -> tuple[Array, Array]:
    """``_generate_core`` vmapped over a leading adapter axis (one prompt batch per adapter); the
    vmapped ``while_loop`` runs until every sequence of every adapter has emitted EOS."""

    def one(adapters: PyTree, tokens: Array, mask: Array) -> tuple[Array, Array]:
        return _generate_core(base, adapters, tokens, mask, key, **static)

    return jax.vmap(one)(adapters, prompt_tokens, prompt_mask)


def _check_left_padded(prompt_mask: Any) -> None:
    """Reject right-padded or empty prompt rows when the mask is concrete (not traced)."""
    if isinstance(prompt_mask, jax.core.Tracer):
        return
    m = np.asarray(prompt_mask)
    if m.ndim < 2 or not np.all(m[..., -1] == 1) or np.any(np.diff(m, axis=-1) < 0):
        raise ValueError(
            "generate: prompt_mask must be [B, P] ([K, B, P] stacked) and left-padded (each row "
            "0...0 1...1 with a real last token); build it with fedlora_jax.model.generate.left_pad"
        )


def generate(
    base: PyTree,
    adapters: PyTree | None,
    prompt_tokens: Array,
    prompt_mask: Array,
    *,
    cfg: LlamaConfig,
    adapter_cfg: AdapterSpec | None = None,
    max_new_tokens: int,
    eos_ids: Sequence[int] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    key: Array | None = None,
    compute_dtype: Any = jnp.float32,
    pad_id: int | None = None,
) -> tuple[Array, Array]:
    """Generate up to ``max_new_tokens`` per left-padded prompt (greedy when temperature == 0).

    Returns (new_tokens [B, max_new_tokens] int32, lengths [B] int32): row i's generation is
    ``new_tokens[i, :lengths[i]]``, EOS included when one was emitted; later slots hold
    ``pad_id`` (default cfg.pad_token_id, else 0). ``eos_ids`` defaults to cfg.eos_ids.
    """
    static = _static(
        cfg, adapter_cfg, max_new_tokens, eos_ids, temperature, top_p, key, compute_dtype, pad_id
    )
    return _generate_jit(*_checked(base, adapters, prompt_tokens, prompt_mask, key), **static)


def generate_stacked(
    base: PyTree,
    adapters: PyTree,
    prompt_tokens: Array,
    prompt_mask: Array,
    *,
    cfg: LlamaConfig,
    adapter_cfg: AdapterSpec | None = None,
    max_new_tokens: int,
    eos_ids: Sequence[int] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    key: Array | None = None,
    compute_dtype: Any = jnp.float32,
    pad_id: int | None = None,
) -> tuple[Array, Array]:
    """``generate`` for K adapters at once: ``adapters`` leaves carry a leading axis K, prompts
    are [K, B, P] (batch k under adapter k); returns [K, B, max_new_tokens] and lengths [K, B].
    One program for every client's personal evaluation (the eval harness)."""
    static = _static(
        cfg, adapter_cfg, max_new_tokens, eos_ids, temperature, top_p, key, compute_dtype, pad_id
    )
    return _generate_stacked_jit(
        *_checked(base, adapters, prompt_tokens, prompt_mask, key), **static
    )


def _checked(base: PyTree, adapters: PyTree, tokens: Any, mask: Any, key: Array | None) -> tuple:
    _check_left_padded(mask)
    key = jax.random.PRNGKey(0) if key is None else key
    return base, adapters, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32), key


def _static(
    cfg: LlamaConfig,
    adapter_cfg: AdapterSpec | None,
    max_new_tokens: int,
    eos_ids: Sequence[int] | None,
    temperature: float,
    top_p: float,
    key: Array | None,
    compute_dtype: Any,
    pad_id: int | None,
) -> dict[str, Any]:
    """The validated static arguments of the jitted generators (one line per bad value)."""
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(
            f"generate: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}"
        )
    if temperature > 0 and key is None:
        raise ValueError("generate: sampling (temperature > 0) needs a PRNG key")
    if pad_id is None:
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    return dict(
        cfg=cfg,
        adapter_cfg=adapter_cfg,
        max_new_tokens=int(max_new_tokens),
        eos_ids=tuple(int(e) for e in (cfg.eos_ids if eos_ids is None else eos_ids)),
        temperature=float(temperature),
        top_p=float(top_p),
        compute_dtype=jnp.dtype(compute_dtype),
        pad_id=int(pad_id),
    )
