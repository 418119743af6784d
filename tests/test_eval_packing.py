"""Packed loss evaluation on the real stories260K model and real Dolly rows.

Each packed example's (sum NLL, loss tokens) is checked against the example alone (a [1, n]
unpadded row through ``llama.apply``'s full logits and ``lm_loss``, no segments, no chunked head),
one example's tokens are perturbed to show no attention crosses segments, and a whole
personal + global ``evaluate`` with unequal splits is compared with the unpacked layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_eval_harness import ADAPTER, _direct_fns, _perturbed

from fedlora_jax.data import load_dolly, tokenize_examples
from fedlora_jax.data.batches import fill_rows
from fedlora_jax.eval import harness
from fedlora_jax.eval.harness import EvalExample, evaluate, from_tokenized
from fedlora_jax.model.tokenizer import load_tokenizer

F32 = jnp.dtype("float32")


@pytest.fixture(scope="module")
def tokenizer(stories_dir):
    return load_tokenizer(stories_dir)


@pytest.fixture(scope="module")
def dolly(tokenizer) -> list[EvalExample]:
    """12 real Dolly rows: the 11 shortest of the first 400 (133-206 tokens under stories260K's
    512-token vocabulary) and one of 512 tokens that sets the row length, in Dolly order."""
    rows = load_dolly(verbose=False).examples[:400]
    ts, _ = tokenize_examples(rows, tokenizer, max_seq_len=512, rows=list(range(len(rows))))
    order = np.argsort(ts.lengths, kind="stable")
    picked = np.sort(np.concatenate([order[:11], order[-1:]]))
    assert ts.lengths[picked].max() == 512
    return [from_tokenized(ts, rows)[i] for i in picked]


def _alone(cfg, base, adapters, ex: EvalExample) -> tuple[float, float]:
    nll, _ = _direct_fns(cfg)
    s, n = nll(base, adapters, jnp.asarray([ex.tokens]), jnp.asarray([ex.loss_mask]))
    return float(s), float(n)


def _packed_call(examples: list[EvalExample], per_call: int):
    """One lane's examples packed (the harness's layout) into calls of ``per_call`` rows."""
    seq_len = harness._bucket(max(len(ex.tokens) for ex in examples))
    rows = harness._packed_rows([list(range(len(examples)))], examples, seq_len)
    shapes = harness._Shapes(batch=per_call, prompt_len=0, seq_len=seq_len, loss_rows=per_call)
    return rows, harness._loss_calls(rows, examples, shapes, pad_id=0)


def test_first_fit_longest_first_and_fill_rows_hand_example() -> None:
    ex = [EvalExample((1,), ("x",), (1,) * n, (0,) + (1,) * (n - 1)) for n in (3, 9, 5, 4, 7)]
    # capacity 16, longest first: 9 -> row 0, 7 -> row 0 (full), 5, 4, 3 -> row 1 (12 slots)
    assert harness._packed_rows([[0, 1, 2, 3, 4]], ex, 16) == [[[1, 4], [2, 3, 0]]]
    tokens, segments, mask, starts = fill_rows(
        [np.array([5, 6, 7]), np.array([8, 9])],
        [np.array([1, 1, 1]), np.array([0, 1])],
        np.array([0, 0]),
        rows=2,
        seq_len=6,
        pad_id=0,
    )
    np.testing.assert_array_equal(tokens, [[5, 6, 7, 8, 9, 0], [0] * 6])
    np.testing.assert_array_equal(segments, [[1, 1, 1, 2, 2, 0], [0] * 6])
    # a segment's first slot is never a target, even when its own mask says 1
    np.testing.assert_array_equal(mask, [[0, 1, 1, 0, 1, 0], [0] * 6])
    np.testing.assert_array_equal(starts, [0, 3])


def test_packed_example_losses_equal_each_example_alone(stories_jax, dolly) -> None:
    cfg, base = stories_jax
    adapters = _perturbed(cfg, 0)
    rows, calls = _packed_call(dolly, per_call=3)
    assert len(calls) >= 2  # several calls; an empty row pads the last one when rows % 3 != 0
    assert max(len(r) for r in rows[0]) >= 3  # several examples share a row
    assert sorted(i for r in rows[0] for i in r) == list(range(len(dolly)))
    fn = harness._loss_fn(cfg, ADAPTER, F32)
    stacked = jax.tree.map(lambda x: x[None], adapters)
    got = {}
    for call in calls:
        got |= harness._example_losses(call, np.asarray(fn(base, stacked, call.tokens,
                                                              call.segments)))  # fmt: skip
    assert sorted(got) == list(range(len(dolly)))
    for i, ex in enumerate(dolly):
        want_sum, want_n = _alone(cfg, base, adapters, ex)
        assert got[i][1] == want_n == sum(ex.loss_mask[1:]) > 0
        assert got[i][0] == pytest.approx(want_sum, rel=1e-5)


def test_perturbing_one_example_leaves_the_others_bitwise(stories_jax, dolly) -> None:
    cfg, base = stories_jax
    stacked = jax.tree.map(lambda x: x[None], _perturbed(cfg, 1))
    _, calls = _packed_call(dolly, per_call=8)
    call = calls[0]
    fn = harness._loss_fn(cfg, ADAPTER, F32)
    row = int(np.argmax(call.segments.max(axis=-1)[0]))  # the row holding most examples
    inside = [s for s in call.slots if s[2] == row]
    assert len(inside) >= 3
    victim = inside[1]  # a middle segment: examples before and after it
    _, k, r, at, n = victim
    changed = call.tokens.copy()
    rng = np.random.default_rng(0)
    changed[k, r, at + 1 : at + n] = rng.integers(3, cfg.vocab_size, n - 1)
    ref = np.asarray(fn(base, stacked, call.tokens, call.segments))
    out = np.asarray(fn(base, stacked, changed, call.segments))
    for i, k, r, at, n in call.slots:
        same = np.array_equal(out[k, r, at : at + n - 1], ref[k, r, at : at + n - 1])
        assert same == (i != victim[0]), i
    before, after = harness._example_losses(call, ref), harness._example_losses(call, out)
    assert {i: v for i, v in after.items() if i != victim[0]} == {
        i: v for i, v in before.items() if i != victim[0]
    }


def _leaves(tree, path=()) -> dict:
    if isinstance(tree, dict):
        return {p: v for k, sub in tree.items() for p, v in _leaves(sub, (*path, k)).items()}
    return {path: tree}


@pytest.mark.parametrize("batch_size", [2, 8])
def test_evaluate_packed_equals_unpacked(stories_jax, dolly, tokenizer, batch_size) -> None:
    """Personal + global, unequal splits (5, 2, 5 examples): the packed report = the unpacked
    one (predictions and counts exactly, losses to fp32 tolerance), and per client = each
    example alone."""
    cfg, base = stories_jax
    splits = [dolly[0:5], dolly[5:7], dolly[7:12]]
    seq_len = harness._bucket(max(len(ex.tokens) for s in splits for ex in s))
    lanes = [list(range(0, 5)), list(range(5, 7)), list(range(7, 12))]
    assert sum(map(len, harness._packed_rows(lanes, dolly, seq_len))) < 12  # it does pack
    glob = _perturbed(cfg, 2)
    trees = [_perturbed(cfg, 3 + i) for i in range(3)]
    personal = jax.tree.map(lambda *x: jnp.stack(x), *trees)
    kwargs = dict(cfg=cfg, adapter_cfg=ADAPTER, tokenizer=tokenizer, max_new_tokens=2,
                  batch_size=batch_size, return_predictions=True)  # fmt: skip
    packed, packed_preds = evaluate(base, glob, personal, splits, **kwargs)
    plain, plain_preds = evaluate(base, glob, personal, splits, packing=False, **kwargs)
    assert packed_preds == plain_preds  # generation untouched

    got, want = _leaves(packed), _leaves(plain)
    assert got.keys() == want.keys() and any(p[-1] == "loss" for p in got)
    for path, value in got.items():
        if not isinstance(value, float):
            assert value == want[path], path
        elif "perplexity" in path:  # exp(loss), loss ~ 12 here: 1e-5 of the loss ~ 1.2e-4 of it
            assert value == pytest.approx(want[path], rel=2e-4), path
        else:  # losses (and gains: their differences) up to fp32 reassociation
            assert value == pytest.approx(want[path], rel=1e-5, abs=1e-4), path
    for i, split in enumerate(splits):
        sums = [_alone(cfg, base, trees[i], ex) for ex in split]
        want = sum(s for s, _ in sums) / sum(n for _, n in sums)
        assert packed["personal"]["per_client"][i]["loss"] == pytest.approx(want, rel=1e-5)
        assert packed["personal"]["per_client"][i]["n_tokens"] == sum(n for _, n in sums)
