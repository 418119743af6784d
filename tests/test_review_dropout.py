"""Adapter dropout is live in client training and off in evaluation; both losses use the
response-token mask on the *predicted* token (checked against a plain numpy NLL).

stories260K cut to 1 layer, one sequence of 12 tokens: compiles in seconds.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from fedlora_jax.adapters import AdapterConfig, init_adapters
from fedlora_jax.algorithms import ClientTraining
from fedlora_jax.algorithms.training import make_loss_fn
from fedlora_jax.eval.harness import EvalExample, evaluate
from fedlora_jax.model import llama
from fedlora_jax.model.convert import load_hf_folder

PROMPT = 5  # BOS + 4 prompt tokens; the remaining 7 tokens are the response (EOS included)


@pytest.fixture(scope="module")
def setup(stories_dir):
    cfg, base = load_hf_folder(stories_dir)
    base = {**base, "layers": jax.tree.map(lambda x: x[:1], base["layers"])}
    cfg = dataclasses.replace(cfg, num_layers=1)
    acfg = AdapterConfig(r=2, alpha=4.0, dropout=0.5, targets="all-linear")
    adapters = init_adapters(jax.random.key(1), cfg, acfg)
    # non-zero B so that dropout on the adapter input changes the output
    adapters = jax.tree.map(
        lambda x: x + 0.2 * jax.random.normal(jax.random.key(2), x.shape), adapters
    )
    tokens = np.random.default_rng(0).integers(3, 500, (1, 12)).astype(np.int32)
    loss_mask = np.zeros_like(tokens)
    loss_mask[:, PROMPT:] = 1
    batch = {"tokens": tokens, "loss_mask": loss_mask, "attn_mask": np.ones_like(tokens)}
    return cfg, base, acfg, adapters, batch


def numpy_nll(cfg, base, acfg, adapters, batch) -> float:
    """Mean NLL of the response tokens: token t+1 predicted from position t, no dropout."""
    logits = np.asarray(
        llama.apply(base, adapters, batch["tokens"], batch["attn_mask"], cfg=cfg, adapter_cfg=acfg),
        np.float64,
    )[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    tokens, mask = batch["tokens"][0], batch["loss_mask"][0]
    nll = [-logp[t, tokens[t + 1]] for t in range(len(tokens) - 1) if mask[t + 1]]
    return float(np.mean(nll))


def test_training_loss_applies_dropout_per_key(setup):
    cfg, base, acfg, adapters, batch = setup
    loss_fn = jax.jit(make_loss_fn(ClientTraining(model=cfg, adapter=acfg)))
    a = float(loss_fn(base, adapters, batch, jax.random.key(0))[0])
    b = float(loss_fn(base, adapters, batch, jax.random.key(7))[0])
    again = float(loss_fn(base, adapters, batch, jax.random.key(0))[0])
    no_dropout = numpy_nll(cfg, base, acfg, adapters, batch)
    assert a == again  # keyed: reproducible
    assert abs(a - b) > 1e-4 and abs(a - no_dropout) > 1e-4  # live in training

    off = make_loss_fn(ClientTraining(model=cfg, adapter=dataclasses.replace(acfg, dropout=0.0)))
    loss, aux = off(base, adapters, batch, jax.random.key(0))
    np.testing.assert_allclose(float(loss), no_dropout, rtol=1e-5)
    assert int(aux["tokens"]) == batch["tokens"].shape[1] - PROMPT


def test_evaluation_loss_has_no_dropout(setup):
    cfg, base, acfg, adapters, batch = setup
    tokens = tuple(int(t) for t in batch["tokens"][0])
    example = EvalExample(
        prompt_ids=tokens[:PROMPT],
        references=("x",),
        tokens=tokens,
        loss_mask=tuple(int(m) for m in batch["loss_mask"][0]),
    )

    class Decoder:
        def decode(self, ids: list[int]) -> str:
            return " ".join(map(str, ids))

    report = evaluate(
        base,
        adapters,
        None,
        [[example]],
        cfg=cfg,
        adapter_cfg=acfg,
        tokenizer=Decoder(),
        max_new_tokens=1,
        batch_size=1,
    )
    np.testing.assert_allclose(
        report["global"]["metrics"]["loss"], numpy_nll(cfg, base, acfg, adapters, batch), rtol=1e-5
    )
