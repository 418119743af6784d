"""Next-token losses: token t+1 is predicted from position t, log-softmax in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def token_nll(logits: Array, tokens: Array) -> Array:
    """NLL [B, T-1] of tokens[:, 1:] under logits[:, :-1] (float32)."""
    logits = logits[:, :-1].astype(jnp.float32)
    target = tokens[:, 1:]
    picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def sequence_nll(logits: Array, tokens: Array, loss_mask: Array) -> tuple[Array, Array]:
    """Per-example (sum of masked NLL [B], number of counted tokens [B]); for per-example eval."""
    weight = loss_mask[:, 1:].astype(jnp.float32)
    return jnp.sum(token_nll(logits, tokens) * weight, axis=-1), jnp.sum(weight, axis=-1)


def lm_loss(logits: Array, tokens: Array, loss_mask: Array) -> tuple[Array, Array]:
    """(sum of NLL over tokens with ``loss_mask[t+1] = 1``, their count), both float32 scalars.

    Returned as a sum and a count so callers can average over micro-batches or clients exactly.
    """
    total, count = sequence_nll(logits, tokens, loss_mask)
    return jnp.sum(total), jnp.sum(count)
