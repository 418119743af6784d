"""Next-token losses: token t+1 is predicted from position t, log-softmax in float32.

Two entry points compute the same numbers. ``lm_loss`` / ``sequence_nll`` take full logits
[B, T, V]; ``lm_loss_from_hidden`` / ``sequence_nll_from_hidden`` take the final-normed hidden
states and run the LM head and the log-sum-exp over ``chunk`` tokens at a time inside a
rematerialised ``lax.scan``, so neither the forward nor the backward ever holds more than
[chunk, V] logits (the full [B, T, V] float32 tensor is 805 MB per client at SmolLM2's 49152
vocabulary, batch 4 x 256).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedlora_jax.model.config import LlamaConfig
from fedlora_jax.model.llama import logits_from_hidden

Array = jax.Array
PyTree = Any

LOSS_CHUNK = 128  # positions per step of the chunked head: [128, 49152] fp32 logits = 25 MB


def token_nll(logits: Array, tokens: Array) -> Array:
    """NLL [B, T-1] of tokens[:, 1:] under logits[:, :-1] (float32)."""
    logits = logits[:, :-1].astype(jnp.float32)
    target = tokens[:, 1:]
    picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def token_nll_from_hidden(
    base: PyTree, h: Array, tokens: Array, *, cfg: LlamaConfig, chunk: int = LOSS_CHUNK
) -> Array:
    """``token_nll(logits_from_hidden(base, h, cfg), tokens)`` without the full logits.

    The B x (T-1) predicting positions are flattened and cut into ``chunk``-sized pieces (the
    last one padded; fewer positions than ``chunk`` make one unpadded piece); each scan step
    computes its piece's logits, log-sum-exp and target logit,
    and ``jax.checkpoint`` makes the backward recompute them rather than store them.
    """
    b, t, d = h.shape
    n = b * (t - 1)
    chunk = min(chunk, n)  # a short batch is one piece, not one padded to ``chunk`` positions
    pieces = -(-n // chunk)
    pad = pieces * chunk - n
    hs = jnp.pad(h[:, :-1].reshape(n, d), ((0, pad), (0, 0))).reshape(pieces, chunk, d)
    targets = jnp.pad(tokens[:, 1:].reshape(n), (0, pad)).reshape(pieces, chunk)

    @jax.checkpoint
    def piece(h_c: Array, target_c: Array) -> Array:
        logits = logits_from_hidden(base, h_c, cfg)  # [chunk, V] float32
        picked = jnp.take_along_axis(logits, target_c[:, None], axis=-1)[:, 0]
        return jax.nn.logsumexp(logits, axis=-1) - picked

    _, nll = jax.lax.scan(lambda c, xs: (c, piece(*xs)), None, (hs, targets))
    return nll.reshape(-1)[:n].reshape(b, t - 1)


def _masked_sums(nll: Array, loss_mask: Array) -> tuple[Array, Array]:
    weight = loss_mask[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * weight, axis=-1), jnp.sum(weight, axis=-1)


def sequence_nll(logits: Array, tokens: Array, loss_mask: Array) -> tuple[Array, Array]:
    """Per-row (sum of masked NLL [B], number of counted tokens [B]); for per-example eval."""
    return _masked_sums(token_nll(logits, tokens), loss_mask)


def sequence_nll_from_hidden(
    base: PyTree,
    h: Array,
    tokens: Array,
    loss_mask: Array,
    *,
    cfg: LlamaConfig,
    chunk: int = LOSS_CHUNK,
) -> tuple[Array, Array]:
    """``sequence_nll`` from final-normed hidden states [B, T, d], chunked (no full logits)."""
    return _masked_sums(token_nll_from_hidden(base, h, tokens, cfg=cfg, chunk=chunk), loss_mask)


def lm_loss(logits: Array, tokens: Array, loss_mask: Array) -> tuple[Array, Array]:
    """(sum of NLL over tokens with ``loss_mask[t+1] = 1``, their count), both float32 scalars.

    Returned as a sum and a count so callers can average over micro-batches or clients exactly.
    """
    total, count = sequence_nll(logits, tokens, loss_mask)
    return jnp.sum(total), jnp.sum(count)


def lm_loss_from_hidden(
    base: PyTree,
    h: Array,
    tokens: Array,
    loss_mask: Array,
    *,
    cfg: LlamaConfig,
    chunk: int = LOSS_CHUNK,
) -> tuple[Array, Array]:
    """``lm_loss`` from final-normed hidden states (``llama.hidden``), chunked: what training
    uses, so no [B, T, V] logits (nor their gradient) are ever materialised."""
    total, count = sequence_nll_from_hidden(base, h, tokens, loss_mask, cfg=cfg, chunk=chunk)
    return jnp.sum(total), jnp.sum(count)
