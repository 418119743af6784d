"""The chunked LM-head loss (``lm_loss_from_hidden``) against the full-logits loss: values and
gradients in fp32 and bf16, uneven chunks, tied and untied heads; and no [B, T, V] array in the
traced gradient program."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax.adapters.base import AdapterConfig
from fedlora_jax.adapters.tree import init_adapters
from fedlora_jax.model import llama
from fedlora_jax.model.config import LlamaConfig
from fedlora_jax.model.loss import (
    lm_loss,
    lm_loss_from_hidden,
    sequence_nll,
    sequence_nll_from_hidden,
)

ACFG = AdapterConfig(kind="lora", r=4, alpha=8.0, targets="qv")
UNTIED = LlamaConfig(
    vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, tie_word_embeddings=False,
)  # fmt: skip


def _lora(cfg: LlamaConfig, seed: int) -> dict:
    """LoRA with non-zero B, so the adapter gradients are not trivially structured."""
    tree = init_adapters(jax.random.PRNGKey(seed), cfg, ACFG)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 64))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: 0.3 * jax.random.normal(next(keys), x.shape) if p[-1].key == "B" else x, tree
    )


def _batch(vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (3, 21)).astype(np.int32)
    attn = np.ones_like(tokens)
    attn[1, 15:] = 0
    loss_mask = attn.copy()
    loss_mask[:, :6] = 0
    return tokens, attn, loss_mask


def _losses(cfg, dtype, chunk):
    def full(base, adapters, tokens, attn, lm):
        logits = llama.apply(base, adapters, tokens, attn, cfg=cfg, adapter_cfg=ACFG,
                             compute_dtype=dtype)  # fmt: skip
        total, n = lm_loss(logits, tokens, lm)
        return total / n

    def chunked(base, adapters, tokens, attn, lm):
        h = llama.hidden(base, adapters, tokens, attn, cfg=cfg, adapter_cfg=ACFG,
                         compute_dtype=dtype)  # fmt: skip
        total, n = lm_loss_from_hidden(base, h, tokens, lm, cfg=cfg, chunk=chunk)
        return total / n

    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=1))  # noqa: E731
    return grad(full), grad(chunked)


@pytest.mark.parametrize("chunk", [7, 16, 1000])  # uneven last piece, exact pieces, one piece
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunked_equals_full_logits_values_and_grads(stories_jax, dtype, chunk):
    cfg, base = stories_jax
    dtype = jnp.dtype(dtype)
    base = jax.tree.map(lambda x: jnp.asarray(x, dtype), base)
    adapters = _lora(cfg, 0)
    tokens, attn, lm = _batch(cfg.vocab_size, 1)
    full, chunked = _losses(cfg, dtype, chunk)
    v0, g0 = full(base, adapters, tokens, attn, lm)
    v1, g1 = chunked(base, adapters, tokens, attn, lm)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-3)
    np.testing.assert_allclose(v1, v0, **tol)
    assert float(v0) > 1.0  # a real loss, not a degenerate zero
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), **tol
        ),
        g1,
        g0,
    )


def test_untied_head_and_per_example_sums():
    cfg = UNTIED
    base = llama.init_random_base(jax.random.PRNGKey(0), cfg)
    tokens, attn, lm = _batch(cfg.vocab_size, 2)
    logits = llama.apply(base, None, tokens, attn, cfg=cfg)
    h = llama.hidden(base, None, tokens, attn, cfg=cfg)
    want = sequence_nll(logits, tokens, lm)
    got = sequence_nll_from_hidden(base, h, tokens, lm, cfg=cfg, chunk=5)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(want[1], [15, 9, 15])  # hand count: 21 - 6, 15 - 6, 21 - 6


def test_gradient_program_never_holds_full_logits(stories_jax):
    """No vocabulary-wide value in the traced value-and-grad program (scan bodies included)
    spans all B x (T-1) predicting positions: logits exist only ``chunk`` rows at a time."""
    cfg, base = stories_jax
    rng = np.random.default_rng(3)
    tokens = rng.integers(3, cfg.vocab_size, (4, 40)).astype(np.int32)
    ones = np.ones_like(tokens)
    chunk = 8
    _, chunked = _losses(cfg, jnp.float32, chunk)
    jaxpr = jax.make_jaxpr(chunked)(base, _lora(cfg, 0), tokens, ones, ones)
    positions = 4 * 39
    assert positions > cfg.hidden_size  # so the [d, V] head weight cannot pass for logits

    def rows_per_vocab(jp):  # elements / V of every value with a vocabulary-sized axis
        for eqn in jp.eqns:
            for v in eqn.outvars:
                shape = getattr(v.aval, "shape", ())
                if cfg.vocab_size in shape:
                    yield int(np.prod(shape)) // cfg.vocab_size
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from rows_per_vocab(sub)

    rows = list(rows_per_vocab(jaxpr.jaxpr))
    assert max(rows) < positions
    assert chunk in rows  # the chunk's logits are there (the probe sees inside the scan)
