"""Sequence packing: the packer on real Dolly rows, and the packed model = the examples one by one
(loss sums and gradients, per-segment positions, no attention across segments)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoTokenizer

from fedlora_jax.adapters.base import AdapterConfig
from fedlora_jax.adapters.tree import init_adapters
from fedlora_jax.data import load_dolly, tokenize_examples
from fedlora_jax.data.batches import (
    client_round_batches,
    epoch_stream,
    first_fit,
    packed_round_batches,
    packing_efficiency,
)
from fedlora_jax.model import llama
from fedlora_jax.model.loss import lm_loss_from_hidden

ACFG = AdapterConfig(kind="lora", r=4, alpha=8.0, targets="qv")
ARGS = {"steps": 2, "batch_size": 2, "seq_len": 512, "seed": 0, "client_id": 0}


@pytest.fixture(scope="module")
def ts(stories_dir):
    tok = AutoTokenizer.from_pretrained(stories_dir)
    rows = load_dolly(verbose=False).examples[::150][:40]
    return tokenize_examples(rows, tok, max_seq_len=256)[0]


def _segments(batch: dict[str, np.ndarray]):
    """(row index, tokens, loss mask) of every packed example, in row order."""
    flat = {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items()}
    for r, seg in enumerate(flat["attn_mask"]):
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))  # contiguous
            yield r, flat["tokens"][r, idx], flat["loss_mask"][r, idx]


def test_first_fit_hand_example():
    # bins of 10: 6 -> bin 0, 5 -> bin 1, 4 -> bin 0 (full), 5 -> bin 1 (full), 3 fits nowhere
    np.testing.assert_array_equal(first_fit(np.array([6, 5, 4, 5, 3, 1]), 2, 10), [0, 1, 0, 1])


def test_packed_rounds_hold_the_stream_in_order_and_nothing_else(ts):
    rounds = [packed_round_batches(ts, round=r, **ARGS) for r in range(3)]
    packed = [seg for b in rounds for seg in _segments(b)]
    # the packed examples are exactly the epoch stream's first positions (none dropped)
    stream = epoch_stream(len(ts), 0, len(packed), seed=0, client_id=0)
    assert len(packed) > 1.5 * 3 * 4  # well over batch_size examples per step
    got = sorted(tuple(p[1]) for p in packed)
    want = sorted(tuple(ts.tokens[i, : ts.lengths[i]]) for i in stream)
    assert got == want
    for _, tokens, loss in packed:
        i = next(i for i in range(len(ts)) if np.array_equal(ts.tokens[i, : len(tokens)], tokens))
        assert loss.tolist() == ts.loss_mask()[i, : len(tokens)].tolist()
    # deterministic in (seed, round, client) and different when any of them changes
    again = packed_round_batches(ts, round=1, **ARGS)
    assert all(np.array_equal(again[k], rounds[1][k]) for k in again)
    for change in ({"seed": 1}, {"client_id": 1}):
        other = packed_round_batches(ts, round=1, **{**ARGS, **change})
        assert not np.array_equal(other["tokens"], rounds[1]["tokens"])
    unpacked = client_round_batches(ts, round=0, **ARGS)
    assert packing_efficiency(rounds[0]) > 1.5 * packing_efficiency(unpacked)


def _lora(cfg):
    tree = init_adapters(jax.random.PRNGKey(0), cfg, ACFG)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 64))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: 0.3 * jax.random.normal(next(keys), x.shape) if p[-1].key == "B" else x, tree
    )


def _sum_nll(base, adapters, tokens, attn, loss_mask, cfg):
    h = llama.hidden(base, adapters, tokens, attn, cfg=cfg, adapter_cfg=ACFG)
    return lm_loss_from_hidden(base, h, tokens, loss_mask, cfg=cfg)


def test_packed_loss_and_grads_equal_sum_over_examples(stories_jax, ts):
    """On real Dolly rows: one packed row's (sum NLL, tokens) and gradient = the sum of its
    examples' computed alone (each [1, n], unpadded)."""
    cfg, base = stories_jax
    adapters = _lora(cfg)
    batch = packed_round_batches(ts, round=0, **{**ARGS, "steps": 1, "batch_size": 1})
    row = {k: v[0] for k, v in batch.items()}  # [1, 512]
    assert row["attn_mask"].max() >= 2  # several examples in the row
    grad = jax.value_and_grad(lambda a, *x: _sum_nll(base, a, *x, cfg)[0])
    total, g_packed = grad(adapters, row["tokens"], row["attn_mask"], row["loss_mask"])
    _, n_packed = _sum_nll(base, adapters, row["tokens"], row["attn_mask"], row["loss_mask"], cfg)
    want, n_want, g_want = 0.0, 0.0, jax.tree.map(jnp.zeros_like, adapters)
    for _, tokens, loss in _segments(batch):
        ones = np.ones((1, len(tokens)), np.int32)
        v, g = grad(adapters, tokens[None], ones, loss[None])
        want, n_want = want + float(v), n_want + float(loss[1:].sum())
        g_want = jax.tree.map(jnp.add, g_want, g)
    assert float(n_packed) == n_want > 0
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    # fp32 sums over ~400 tokens: compare each leaf to 1e-4 of its largest entry (in float64
    # the two differ by 1e-6 of it: the attention softmax is fp32 by design)
    for a, b in zip(jax.tree.leaves(g_packed), jax.tree.leaves(g_want), strict=True):
        b = np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())


def test_perturbing_one_segment_leaves_the_others_bitwise(stories_jax):
    cfg, base = stories_jax
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.vocab_size, (2, 40)).astype(np.int32)
    seg = np.zeros((2, 40), np.int32)
    seg[:, :12], seg[:, 12:25], seg[:, 25:36] = 1, 2, 3  # 4 pads at the end
    fwd = jax.jit(llama.apply, static_argnames=("cfg",))
    ref = np.asarray(fwd(base, None, tokens, seg, cfg=cfg))
    changed = tokens.copy()
    changed[:, 12:25] = rng.integers(3, cfg.vocab_size, (2, 13))
    out = np.asarray(fwd(base, None, changed, seg, cfg=cfg))
    others = (seg == 1) | (seg == 3)
    assert np.array_equal(out[others], ref[others])
    assert not np.allclose(out[seg == 2], ref[seg == 2])
    # and each segment equals its tokens alone (positions restart at 0)
    alone = np.asarray(fwd(base, None, tokens[:1, 25:36], np.ones((1, 11), np.int32), cfg=cfg))
    np.testing.assert_allclose(ref[0, 25:36], alone[0], atol=1e-4)


def test_segment_positions_hand_example_and_plain_masks():
    seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(
        llama.segment_positions(seg), [[0, 1, 2, 0, 1, 0, 5, 5], [0, 0, 0, 1, 2, 3, 4, 5]]
    )
    for mask in ([[1, 1, 1, 0, 0]], [[0, 0, 1, 1, 1]], [[1, 1, 0, 1, 1]]):
        mask = np.array(mask)
        np.testing.assert_array_equal(
            llama.segment_positions(mask), llama.positions_from_mask(mask)
        )
