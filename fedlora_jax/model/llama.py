"""Pure-function LLaMA forward matching ``transformers.LlamaForCausalLM``; adapters, KV cache.

Layer weights are stacked on a leading axis and the forward is a ``lax.scan`` over layers, so
compile time does not grow with depth. Adapters are a per-layer dict; layers that share the same
adapter structure are stacked inside the function and scanned together, so a target set that
covers only some layers splits into a few scanned segments (no zero-filled fake adapters).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax.model.config import ATTN_MODULES, MLP_MODULES, LlamaConfig

Array = jax.Array
PyTree = Any
Cache = dict[str, Array]

# Fixed module order: the index folded into the dropout key of each adapted linear.
_MODULE_INDEX = {name: i for i, name in enumerate(ATTN_MODULES + MLP_MODULES)}
_GROUP = {**{m: "attn" for m in ATTN_MODULES}, **{m: "mlp" for m in MLP_MODULES}}


class AdapterSpec(Protocol):
    """What the forward needs from an adapter config (``adapters.AdapterConfig``): the additive
    output of one adapted linear. The model never imports the adapters."""

    def apply(self, leaf: dict[str, Array], x: Array, key: Array | None) -> Array: ...


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse RoPE frequencies [head_dim/2], float32, as HF's ``ROPE_INIT_FUNCTIONS`` computes."""
    dim = cfg.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)
    rs = cfg.rope_scaling
    if rs.rope_type == "default":
        return inv_freq
    if rs.rope_type == "linear":
        return (inv_freq / np.float32(rs.factor)).astype(np.float32)
    if rs.rope_type == "llama3":
        # Transcribed from transformers' _compute_llama3_parameters (op for op, float32).
        old_len = rs.original_max_position_embeddings
        low_wavelen = old_len / rs.low_freq_factor
        high_wavelen = old_len / rs.high_freq_factor
        wavelen = (2 * math.pi / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(rs.factor), inv_freq)
        span = rs.high_freq_factor - rs.low_freq_factor
        smooth = ((old_len / wavelen - rs.low_freq_factor) / span).astype(np.float32)
        smoothed = (1 - smooth) * scaled / np.float32(rs.factor) + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(
        f"rope_scaling.rope_type={rs.rope_type!r} unsupported; allowed: default, linear, llama3"
    )


def _rope_cos_sin(cfg: LlamaConfig, positions: Array, dtype: jnp.dtype) -> tuple[Array, Array]:
    """cos/sin [B, T, head_dim] for integer positions [B, T]; angles in float32 like HF."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(rope_inv_freq(cfg))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x [B, T, H, hd] rotated HF-style (rotate_half, not interleaved)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def positions_from_mask(attn_mask: Array, offset: Array | int = 0) -> Array:
    """Position ids = offset + (number of real tokens before) ; pads get the clipped value.

    Equals HF generate's ``cumsum(mask) - 1`` convention on real tokens for left and right padding.
    """
    return jnp.maximum(offset + jnp.cumsum(attn_mask.astype(jnp.int32), axis=-1) - 1, 0)


def segment_positions(segments: Array) -> Array:
    """Position ids [B, T] that restart at 0 in every segment of a packed row.

    ``segments`` [B, T]: 0 = padding, 1..S = the row's examples, each contiguous and in increasing
    order (``data.batches.packed_round_batches``). Position = real tokens before t in the row
    minus those of lower-numbered segments; for a 0/1 mask that is ``positions_from_mask``
    exactly, pads included.
    """
    seg = segments.astype(jnp.int32)
    real = (seg > 0).astype(jnp.int32)
    per_segment = jax.vmap(lambda r, s: jax.ops.segment_sum(r, s, num_segments=seg.shape[-1] + 1))(
        real, seg
    )  # [B, T+1]: real tokens of each segment id (id 0 holds none)
    earlier = jnp.cumsum(per_segment, axis=-1) - per_segment
    before = jnp.take_along_axis(earlier, seg, axis=-1)
    return jnp.maximum(jnp.cumsum(real, axis=-1) - 1 - before, 0)


def segment_mask(segments: Array) -> Array:
    """allowed [B, T, T]: causal, key real, query and key in the same segment.

    Pad queries (segment 0) see every earlier real key, as with a plain 0/1 mask (their outputs
    are never used); so a 0/1 mask gives exactly the unpacked mask.
    """
    t = segments.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    q, k = segments[:, :, None], segments[:, None, :]
    return causal[None] & (k > 0) & ((q == k) | (q == 0))


# ----------------------------------------------------------------------------- building blocks


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """RMSNorm in float32, cast back to the input dtype before the weight (as HF does)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def _linear(
    x: Array,
    w: Array,
    name: str,
    leaves: dict[str, Any],
    adapter_cfg: AdapterSpec | None,
    key: Array | None,
) -> Array:
    """``x @ W0`` plus the adapter's additive output when this module is adapted."""
    y = x @ w.astype(x.dtype)
    leaf = leaves.get(_GROUP[name], {}).get(name)
    if leaf is None:
        return y
    mkey = None if key is None else jax.random.fold_in(key, _MODULE_INDEX[name])
    return y + adapter_cfg.apply(leaf, x, mkey).astype(y.dtype)


def _attend(q: Array, k: Array, v: Array, allowed: Array) -> Array:
    """GQA attention. q [B,Tq,Hq,hd], k/v [B,Tk,Hkv,hd], allowed [B,Tq,Tk] -> [B,Tq,Hq*hd].

    ``jax.nn.dot_product_attention`` (XLA here; the cuDNN kernel where jax selects it): query
    head h uses kv head h // (Hq/Hkv), as HF's ``repeat_kv``; scores accumulate and soft-max in
    float32 (HF eager soft-maxes in float32 too). Fully masked rows (pad queries) get a uniform
    softmax instead of NaN; their outputs are never used.
    """
    b, tq, hq, hd = q.shape
    out = jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], scale=hd**-0.5)
    return out.reshape(b, tq, hq * hd)


def _layer(
    h: Array,
    lp: dict[str, Any],
    la: dict[str, Any],
    layer_idx: Array,
    kv: tuple[Array, Array] | None,
    *,
    cfg: LlamaConfig,
    adapter_cfg: AdapterSpec | None,
    cos: Array,
    sin: Array,
    allowed: Array,
    write_index: Array | None,
    dropout_key: Array | None,
) -> tuple[Array, tuple[Array, Array] | None]:
    """One decoder layer. With ``kv`` (this layer's cache), writes the chunk's K/V at
    ``write_index`` and attends over the whole cache."""
    key = None if dropout_key is None else jax.random.fold_in(dropout_key, layer_idx)
    b, t, _ = h.shape

    def lin(x: Array, group: str, name: str) -> Array:
        return _linear(x, lp[group][name], name, la, adapter_cfg, key)

    x = rms_norm(h, lp["input_norm"], cfg.rms_norm_eps)
    q = lin(x, "attn", "q_proj").reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = lin(x, "attn", "k_proj").reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = lin(x, "attn", "v_proj").reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
    if kv is not None:
        k_cache, v_cache = kv
        k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), write_index, 1)
        v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), write_index, 1)
        kv = (k, v)
        k, v = k.astype(h.dtype), v.astype(h.dtype)
    attn = _attend(q, k, v, allowed)
    h = h + lin(attn, "attn", "o_proj")

    x = rms_norm(h, lp["post_attn_norm"], cfg.rms_norm_eps)
    gated = jax.nn.silu(lin(x, "mlp", "gate_proj")) * lin(x, "mlp", "up_proj")
    h = h + lin(gated, "mlp", "down_proj")
    return h, kv


# ----------------------------------------------------------------------------- adapter segments


def _layer_adapters(adapters: PyTree, cfg: LlamaConfig) -> list[dict[str, Any]]:
    """Per-layer adapter dicts (``{}`` where a layer has none); rejects paths the model lacks."""
    if not adapters:
        return [{} for _ in range(cfg.num_layers)]
    extra = set(adapters) - {"layers"}
    per_layer = adapters.get("layers", {})
    extra |= {f"layers.{i}" for i in per_layer if i not in {str(j) for j in range(cfg.num_layers)}}
    for i, layer in per_layer.items():
        for group, mods in layer.items():
            allowed = ATTN_MODULES if group == "attn" else MLP_MODULES if group == "mlp" else ()
            extra |= {f"layers.{i}.{group}.{m}" for m in mods if m not in allowed}
    if extra:
        raise ValueError(
            f"adapters contain paths the model does not have: {', '.join(sorted(extra))}; "
            f"expected layers.{{0..{cfg.num_layers - 1}}}.attn.(q|k|v|o)_proj / "
            "mlp.(gate|up|down)_proj"
        )
    return [per_layer.get(str(i), {}) for i in range(cfg.num_layers)]


def _signature(tree: PyTree) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((x.shape, x.dtype) for x in leaves)


def _segments(layer_adapters: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of consecutive layers with identical adapter structure."""
    sigs = [_signature(a) for a in layer_adapters]
    bounds = [0] + [i for i in range(1, len(sigs)) if sigs[i] != sigs[i - 1]] + [len(sigs)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _slice_layers(tree: PyTree, start: int, end: int, total: int) -> PyTree:
    if start == 0 and end == total:
        return tree
    return jax.tree.map(lambda x: x[start:end], tree)


# ----------------------------------------------------------------------------- forward


REMAT_POLICIES = ("none", "layer", "dots_saveable")


def _remat(body: Any, remat: bool | str) -> Any:
    """The layer body under a remat policy: ``none`` (False) keeps every activation for the
    backward, ``layer`` (True) keeps only the layer inputs and recomputes the rest, and
    ``dots_saveable`` keeps the matmul outputs too (recomputing only the cheap elementwise ops).
    docs/model.md has the measured memory of each."""
    if remat is False or remat == "none":
        return body
    if remat is True or remat == "layer":
        return jax.checkpoint(body, prevent_cse=False)
    if remat == "dots_saveable":
        return jax.checkpoint(body, prevent_cse=False, policy=jax.checkpoint_policies.dots_saveable)
    raise ValueError(f"remat={remat!r} is not allowed; allowed: {', '.join(REMAT_POLICIES)}")


def _run_layers(
    base: PyTree,
    adapters: PyTree,
    h: Array,
    cache_kv: tuple[Array, Array] | None,
    *,
    cfg: LlamaConfig,
    adapter_cfg: AdapterSpec | None,
    dropout_key: Array | None,
    remat: bool | str,
    **layer_kwargs: Any,
) -> tuple[Array, tuple[Array, Array] | None]:
    """Scan the decoder layers, one scan per segment of identical adapter structure."""
    layer_adapters = _layer_adapters(adapters, cfg)
    if any(layer_adapters) and adapter_cfg is None:
        raise ValueError("apply: adapters were given but adapter_cfg is None")

    def body(h: Array, lp: PyTree, la: PyTree, idx: Array, kv: Any) -> tuple[Array, Any]:
        return _layer(
            h,
            lp,
            la,
            idx,
            kv,
            cfg=cfg,
            adapter_cfg=adapter_cfg,
            dropout_key=dropout_key,
            **layer_kwargs,
        )

    body = _remat(body, remat)

    def step(carry: Array, xs: tuple) -> tuple[Array, Any]:
        return body(carry, *xs)

    new_kv = []
    L = cfg.num_layers
    for start, end in _segments(layer_adapters):
        lp = _slice_layers(base["layers"], start, end, L)
        la = jax.tree.map(lambda *xs: jnp.stack(xs), *layer_adapters[start:end])
        kv = None if cache_kv is None else _slice_layers(cache_kv, start, end, L)
        h, kv_out = jax.lax.scan(step, h, (lp, la, jnp.arange(start, end), kv))
        new_kv.append(kv_out)
    if cache_kv is None:
        return h, None
    if len(new_kv) == 1:
        return h, new_kv[0]
    return h, tuple(jnp.concatenate(parts) for parts in zip(*new_kv, strict=True))


def _embed(base: PyTree, tokens: Array, compute_dtype: jnp.dtype) -> Array:
    return jnp.take(base["embed"], tokens, axis=0).astype(compute_dtype)


def logits_from_hidden(base: PyTree, h: Array, cfg: LlamaConfig) -> Array:
    """Final-normed hidden states [..., d] -> float32 logits [..., V] (tied or untied head)."""
    w = base["embed"].T if cfg.tie_word_embeddings else base["lm_head"]
    return jnp.matmul(h, w.astype(h.dtype), preferred_element_type=jnp.float32)


def hidden(
    base: PyTree,
    adapters: PyTree | None,
    tokens: Array,
    attn_mask: Array,
    *,
    cfg: LlamaConfig,
    adapter_cfg: AdapterSpec | None = None,
    dropout_key: Array | None = None,
    compute_dtype: jnp.dtype = jnp.float32,
    remat: bool | str = False,
) -> Array:
    """Final-normed hidden states [B, T, d] (compute dtype); ``apply`` minus the LM head."""
    cos, sin = _rope_cos_sin(cfg, segment_positions(attn_mask), compute_dtype)
    allowed = segment_mask(attn_mask)
    h, _ = _run_layers(
        base,
        adapters,
        _embed(base, tokens, compute_dtype),
        None,
        cfg=cfg,
        adapter_cfg=adapter_cfg,
        dropout_key=dropout_key,
        remat=remat,
        cos=cos,
        sin=sin,
        allowed=allowed,
        write_index=None,
    )
    return rms_norm(h, base["norm"], cfg.rms_norm_eps)


def apply(
    base: PyTree,
    adapters: PyTree | None,
    tokens: Array,
    attn_mask: Array,
    *,
    cfg: LlamaConfig,
    adapter_cfg: AdapterSpec | None = None,
    dropout_key: Array | None = None,
    compute_dtype: jnp.dtype = jnp.float32,
    remat: bool | str = False,
) -> Array:
    """Logits [B, T, V] float32 for tokens [B, T] with ``attn_mask`` (1 = real; left or right pad).

    ``attn_mask`` may hold segment ids of packed rows (0 = pad, 1..S): attention stays inside a
    segment and positions restart per segment (``segment_positions``, ``segment_mask``).

    ``dropout_key`` None = no adapter dropout (eval). ``remat`` checkpoints each layer: a policy
    of ``REMAT_POLICIES`` (True = "layer", False = "none").
    """
    h = hidden(
        base,
        adapters,
        tokens,
        attn_mask,
        cfg=cfg,
        adapter_cfg=adapter_cfg,
        dropout_key=dropout_key,
        compute_dtype=compute_dtype,
        remat=remat,
    )
    return logits_from_hidden(base, h, cfg)


# ----------------------------------------------------------------------------- KV cache


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype: jnp.dtype = jnp.float32) -> Cache:
    """Empty KV cache: ``k``/``v`` [L, B, max_len, Hkv, hd], ``mask`` [B, max_len] (1 = a real
    token is stored in that slot), ``index`` (next slot to write), ``pos`` [B] (next position id).
    """
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "mask": jnp.zeros((batch, max_len), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
        "pos": jnp.zeros((batch,), jnp.int32),
    }


def apply_with_cache(
    base: PyTree,
    adapters: PyTree | None,
    tokens: Array,
    attn_mask: Array,
    cache: Cache,
    *,
    cfg: LlamaConfig,
    adapter_cfg: AdapterSpec | None = None,
    compute_dtype: jnp.dtype = jnp.float32,
) -> tuple[Array, Cache]:
    """Process a chunk [B, T] (a left-padded prompt, then one token per step) against the cache.

    Returns the chunk's float32 logits [B, T, V] and the updated cache. The chunk occupies slots
    ``[index, index + T)``; the caller must keep ``index + T <= max_len``.
    """
    b, t = tokens.shape
    max_len = cache["mask"].shape[1]
    index = cache["index"]
    positions = positions_from_mask(attn_mask, cache["pos"][:, None])
    cos, sin = _rope_cos_sin(cfg, positions, compute_dtype)
    mask = jax.lax.dynamic_update_slice_in_dim(cache["mask"], attn_mask.astype(jnp.int32), index, 1)
    slots = jnp.arange(max_len)
    causal = slots[None, :] <= (index + jnp.arange(t))[:, None]
    allowed = causal[None] & (mask[:, None, :] > 0)
    h, (k, v) = _run_layers(
        base,
        adapters,
        _embed(base, tokens, compute_dtype),
        (cache["k"], cache["v"]),
        cfg=cfg,
        adapter_cfg=adapter_cfg,
        dropout_key=None,
        remat=False,
        cos=cos,
        sin=sin,
        allowed=allowed,
        write_index=index,
    )
    logits = logits_from_hidden(base, rms_norm(h, base["norm"], cfg.rms_norm_eps), cfg)
    new_cache = {
        "k": k,
        "v": v,
        "mask": mask,
        "index": index + t,
        "pos": cache["pos"] + jnp.sum(attn_mask.astype(jnp.int32), axis=-1),
    }
    return logits, new_cache


# ----------------------------------------------------------------------------- random init


def init_random_base(key: Array, cfg: LlamaConfig, dtype: jnp.dtype = jnp.float32) -> PyTree:
    """Random weights (normal, std 0.02; norms 1) in the base pytree layout (tests, benchmarks)."""
    L, d, f = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    dq, dkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {
        "embed": (cfg.vocab_size, d),
        "layers": {
            "attn": {
                "q_proj": (L, d, dq),
                "k_proj": (L, d, dkv),
                "v_proj": (L, d, dkv),
                "o_proj": (L, dq, d),
            },
            "mlp": {"gate_proj": (L, d, f), "up_proj": (L, d, f), "down_proj": (L, f, d)},
        },
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (d, cfg.vocab_size)
    flat, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(flat))
    draws = [0.02 * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, flat, strict=True)]
    base = jax.tree.unflatten(treedef, draws)
    base = jax.tree.map(lambda x: x.astype(dtype), base)
    base["layers"]["input_norm"] = jnp.ones((L, d), dtype)
    base["layers"]["post_attn_norm"] = jnp.ones((L, d), dtype)
    base["norm"] = jnp.ones((d,), dtype)
    return base
