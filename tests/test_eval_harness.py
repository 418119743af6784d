"""``evaluate`` on the real stories260K model: 2 clients x 3 short examples.

Losses are checked against an independent per-example forward (unpadded, batch of 1), generations
against ``generate`` on each unpadded prompt alone, and a repeated call must trace nothing.
"""

from __future__ import annotations

import collections
import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax.adapters.base import AdapterConfig
from fedlora_jax.adapters.tree import init_adapters
from fedlora_jax.eval import harness
from fedlora_jax.eval.harness import (
    EvalExample,
    as_example,
    evaluate,
    from_tokenized,
    strip_at_eos,
)
from fedlora_jax.model import llama
from fedlora_jax.model.convert import load_hf_folder
from fedlora_jax.model.generate import generate
from fedlora_jax.model.loss import lm_loss
from fedlora_jax.model.tokenizer import load_tokenizer

MAX_NEW = 4
# (prompt, response) per client; category alternates so the breakdown has two groups.
TEXTS = [
    [("Once upon a time", " there was a girl."), ("The dog", " ran fast."),
     ("Lily liked to", " play outside.")],
    [("Tom had a", " red ball."), ("One day, the", " sun was hot."),
     ("She was very", " happy.")],
]  # fmt: skip
ADAPTER = AdapterConfig(kind="lora", r=2, alpha=4.0, targets="qv")


@pytest.fixture(scope="module")
def model(stories_dir: pathlib.Path):
    cfg, base = load_hf_folder(stories_dir)
    return cfg, base


@pytest.fixture(scope="module")
def tokenizer(stories_dir: pathlib.Path):
    return load_tokenizer(stories_dir)


@pytest.fixture(scope="module")
def clients_test(tokenizer) -> list[list[EvalExample]]:
    eos = tokenizer.eos_token_id
    splits = []
    for c, pairs in enumerate(TEXTS):
        split = []
        for j, (prompt, response) in enumerate(pairs):
            p = tokenizer(prompt).input_ids
            r = tokenizer(response, add_special_tokens=False).input_ids + [eos]
            split.append(
                EvalExample(
                    prompt_ids=tuple(p),
                    references=(response.strip(),),
                    tokens=tuple(p + r),
                    loss_mask=(0,) * len(p) + (1,) * len(r),
                    category=("a", "b")[(c + j) % 2],
                )
            )
        splits.append(split)
    return splits


def _perturbed(model_cfg, seed: int) -> dict:
    """A LoRA with non-zero B (fresh B is zero, which would make every adapter equal the base)."""
    tree = init_adapters(jax.random.PRNGKey(seed), model_cfg, ADAPTER)
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(100 + seed), len(leaves))
    noisy = [x + 0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, noisy)


@pytest.fixture(scope="module")
def adapters(model):
    cfg, _ = model
    glob = _perturbed(cfg, 0)
    personal = jax.tree.map(lambda *xs: jnp.stack(xs), _perturbed(cfg, 1), _perturbed(cfg, 2))
    return glob, personal


class TraceCounter:
    """Counts jaxpr traces by function name through jax.monitoring."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def __call__(self, event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/jaxpr_trace_duration":
            self.counts[kwargs.get("fun_name", "?")] += 1

    def __enter__(self) -> TraceCounter:
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self)


@pytest.fixture(scope="module")
def run(model, adapters, clients_test, tokenizer):
    """First call (compiles) and an identical second call, with trace counts for both."""
    cfg, base = model
    glob, personal = adapters
    kwargs = dict(cfg=cfg, adapter_cfg=ADAPTER, tokenizer=tokenizer, max_new_tokens=MAX_NEW,
                  batch_size=2, return_predictions=True)  # fmt: skip
    with TraceCounter() as first:
        report, preds = evaluate(base, glob, personal, clients_test, **kwargs)
    with TraceCounter() as second:
        again, _ = evaluate(base, glob, personal, clients_test, **kwargs)
    return report, preds, again, first.counts, second.counts


@functools.cache
def _direct_fns(cfg):
    """Unpadded batch-of-1 loss and generation (jitted: one compile per distinct length)."""

    @jax.jit
    def nll(base, adapters, tokens, loss_mask):
        logits = llama.apply(base, adapters, tokens, jnp.ones_like(tokens), cfg=cfg,
                             adapter_cfg=ADAPTER)  # fmt: skip
        return lm_loss(logits, tokens, loss_mask)

    def gen(base, adapters, prompt):
        return generate(base, adapters, prompt, jnp.ones_like(prompt), cfg=cfg,
                        adapter_cfg=ADAPTER, max_new_tokens=MAX_NEW)  # fmt: skip

    return nll, gen


def _direct_loss(cfg, base, adapters, examples) -> float:
    nll, _ = _direct_fns(cfg)
    total, count = 0.0, 0.0
    for ex in examples:
        s, n = nll(base, adapters, jnp.asarray([ex.tokens]), jnp.asarray([ex.loss_mask]))
        total, count = total + float(s), count + float(n)
    return total / count


def _direct_prediction(cfg, base, adapters, ex, tokenizer) -> str:
    _, gen = _direct_fns(cfg)
    out, n = gen(base, adapters, jnp.asarray([ex.prompt_ids], jnp.int32))
    return tokenizer.decode(strip_at_eos(np.asarray(out)[0, : int(n[0])], cfg.eos_ids)).strip()


def test_report_structure_and_ranges(run, clients_test) -> None:
    report, preds, *_ = run
    g, loc = report["global"], report["personal"]
    assert g["metrics"]["n_examples"] == 6 and g["n_clients"] == 2
    assert loc["adapter"] == "personal"
    assert sorted(loc["per_client"]) == [0, 1]
    assert [loc["per_client"][i]["n_examples"] for i in (0, 1)] == [3, 3]
    assert sorted(g["by_category"]) == ["a", "b"] == sorted(loc["by_category"])
    for m in [g["metrics"], *loc["per_client"].values()]:
        assert 0.0 <= m["rouge_l"] <= 1.0 and 0.0 <= m["exact_match"] <= 1.0
        assert m["loss"] > 0 and math.isfinite(m["loss"])
    n_resp = [sum(ex.loss_mask) for s in clients_test for ex in s]
    assert g["metrics"]["n_tokens"] == sum(n_resp)
    assert [p["client_id"] for p in preds["global"]] == [0, 0, 0, 1, 1, 1]
    assert [p["client_id"] for p in preds["personal"]] == [0, 0, 0, 1, 1, 1]


def test_losses_match_direct_forward(run, model, adapters, clients_test) -> None:
    report, *_ = run
    cfg, base = model
    glob, personal = adapters
    every = [ex for s in clients_test for ex in s]
    assert report["global"]["metrics"]["loss"] == pytest.approx(
        _direct_loss(cfg, base, glob, every), rel=1e-5
    )
    for i, split in enumerate(clients_test):
        personal_i = jax.tree.map(lambda x, i=i: x[i], personal)
        assert report["personal"]["per_client"][i]["loss"] == pytest.approx(
            _direct_loss(cfg, base, personal_i, split), rel=1e-5
        )
    # The adapters differ, so the sections must too (guards against scoring one adapter twice).
    assert report["personal"]["per_client"][0]["loss"] != report["global"]["metrics"]["loss"]


def test_generations_match_unbatched_generate(run, model, adapters, clients_test, tokenizer):
    _, preds, *_ = run
    cfg, base = model
    glob, personal = adapters
    every = [ex for s in clients_test for ex in s]
    for ex, rec in zip(every, preds["global"], strict=True):
        assert rec["prediction"] == _direct_prediction(cfg, base, glob, ex, tokenizer)
    personal_1 = jax.tree.map(lambda x: x[1], personal)
    for ex, rec in zip(clients_test[1], preds["personal"][3:], strict=True):
        assert rec["prediction"] == _direct_prediction(cfg, base, personal_1, ex, tokenizer)


def test_second_call_does_not_retrace(run) -> None:
    report, _, again, first, second = run
    # One compilation per jitted function for both sections and all clients ...
    assert first["_generate_stacked_jit"] == 1 and first["lane_token_nll"] == 1
    # ... and none at all when the next round evaluates the same test sets.
    assert sum(second.values()) == 0, dict(second)
    assert again == report


def test_vmapped_personal_equals_per_client_loop(run, model, adapters, clients_test, tokenizer):
    """All clients in one vmapped program = each client evaluated alone (its own program)."""
    report, preds, *_ = run
    cfg, base = model
    _, personal = adapters
    for i, split in enumerate(clients_test):
        alone, alone_preds = evaluate(
            base, None, jax.tree.map(lambda x, i=i: x[i : i + 1], personal), [split],
            cfg=cfg, adapter_cfg=ADAPTER, tokenizer=tokenizer, max_new_tokens=MAX_NEW,
            batch_size=2, return_predictions=True,
        )  # fmt: skip
        got, want = report["personal"]["per_client"][i], alone["personal"]["per_client"][0]
        floats = ("loss", "perplexity")  # float reassociation between the two programs
        for k in floats:
            assert got[k] == pytest.approx(want[k], rel=1e-5)
        assert {k: v for k, v in got.items() if k not in floats} == {
            k: v for k, v in want.items() if k not in floats
        }
        mine = [r["prediction"] for r in preds["personal"] if r["client_id"] == i]
        assert mine == [r["prediction"] for r in alone_preds["personal"]]


def test_without_personal_local_is_global(run, model, adapters, clients_test, tokenizer) -> None:
    cfg, base = model
    glob, _ = adapters
    kwargs = dict(cfg=cfg, adapter_cfg=ADAPTER, tokenizer=tokenizer, max_new_tokens=MAX_NEW,
                  batch_size=2)  # fmt: skip
    report = evaluate(base, glob, None, clients_test, **kwargs)
    assert report["personal"]["adapter"] == "global"
    assert report["global"] == run[0]["global"]
    g = report["global"]["metrics"]
    # data-weighted mean over clients of the global adapter = the example-weighted global mean
    assert report["personal"]["summary"]["rouge_l"]["weighted_mean"] == pytest.approx(g["rouge_l"])
    # "personal = global" is the algorithm's flag (personal None), never an array comparison: the
    # global adapter replicated per client is scored as personal adapters, with the same numbers.
    replicated = jax.tree.map(lambda x: jnp.stack([x, x]), glob)
    as_personal = evaluate(base, glob, replicated, clients_test, **kwargs)
    assert as_personal["personal"]["adapter"] == "personal"
    assert as_personal["personal"]["summary"] == report["personal"]["summary"]


def test_local_only_has_no_global(run, model, adapters, clients_test, tokenizer) -> None:
    cfg, base = model
    _, personal = adapters
    report = evaluate(base, None, personal, clients_test, cfg=cfg, adapter_cfg=ADAPTER,
                      tokenizer=tokenizer, max_new_tokens=MAX_NEW, batch_size=2)  # fmt: skip
    assert report["global"] is None
    assert report["personal"] == run[0]["personal"]


def test_bad_inputs_have_clear_errors(model, adapters, clients_test, tokenizer) -> None:
    cfg, base = model
    glob, personal = adapters
    kwargs = dict(cfg=cfg, adapter_cfg=ADAPTER, tokenizer=tokenizer, max_new_tokens=MAX_NEW)
    with pytest.raises(ValueError, match="both global_adapters and personal_adapters are None"):
        evaluate(base, None, None, clients_test, **kwargs)
    with pytest.raises(ValueError, match="2 clients on its leading axis but clients_test has 1"):
        evaluate(base, None, personal, clients_test[:1], **kwargs)
    with pytest.raises(ValueError, match=r"clients \[1\] have no test examples"):
        evaluate(base, glob, None, [clients_test[0], []], **kwargs)
    with pytest.raises(ValueError, match="lacks keys \\['references'\\]"):
        as_example({"prompt_ids": [1], "tokens": [1, 2], "loss_mask": [0, 1]})
    with pytest.raises(ValueError, match="differ in length"):
        EvalExample(prompt_ids=(1,), references=("x",), tokens=(1, 2), loss_mask=(1,))


def test_mapping_examples_and_strip_at_eos() -> None:
    ex = as_example({"prompt_ids": [1, 5], "references": ["a", "b"], "tokens": [1, 5, 2],
                     "loss_mask": [0, 0, 1]})  # fmt: skip
    assert ex == EvalExample((1, 5), ("a", "b"), (1, 5, 2), (0, 0, 1), "all")
    assert strip_at_eos([5, 6, 2, 7, 2], (2,)) == [5, 6]
    assert strip_at_eos([5, 6], (2,)) == [5, 6]


def test_from_tokenized_data_module(tokenizer) -> None:
    from fedlora_jax.data.rows import Example
    from fedlora_jax.data.tokenize import tokenize_examples

    rows = [
        Example("Say hi", "", "hi there", "open_qa", 1),
        Example(
            "Name a color", "red or blue", "red", "classification", 2, references=("red", "blue")
        ),
    ]
    ts, _ = tokenize_examples(rows, tokenizer, max_seq_len=256, rows=[1, 0])
    out = from_tokenized(ts, rows)
    assert [ex.category for ex in out] == ["classification", "open_qa"]
    assert out[0].references == ("red", "blue") and out[1].references == ("hi there",)
    for ex in out:
        n_prompt = len(ex.prompt_ids)
        assert ex.tokens[:n_prompt] == ex.prompt_ids and ex.tokens[0] == tokenizer.bos_token_id
        assert ex.loss_mask == (0,) * n_prompt + (1,) * (len(ex.tokens) - n_prompt)
        assert ex.tokens[-1] == tokenizer.eos_token_id
    response = out[1].tokens[len(out[1].prompt_ids) : -1]
    assert tokenizer.decode(list(response)).strip() == "hi there"


def test_heap_released_after_calls_that_compile(
    model, adapters, clients_test, tokenizer, monkeypatch
):
    cfg, base = model
    glob, _ = adapters
    calls = []
    monkeypatch.setattr(harness, "release_free_heap", lambda: calls.append(1) or True)
    kwargs = dict(
        cfg=cfg, adapter_cfg=ADAPTER, tokenizer=tokenizer, max_new_tokens=MAX_NEW + 1, batch_size=2
    )  # MAX_NEW + 1: a generation length no other test compiled
    evaluate(base, glob, None, clients_test, **kwargs)
    assert len(calls) == 1  # the first call compiled generation and the loss
    evaluate(base, glob, None, clients_test, **kwargs)
    assert len(calls) == 1  # same shapes: nothing compiled, nothing to release
