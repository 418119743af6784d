"""Personalisation gain (personal − global on each client's own test rows) and the global label.

Hand-made scores with gains worked by hand; then the real harness on stories260K with two clients
whose adapters are known (client 0's personal adapter IS the global one, so its gain must be 0),
against an independent unpadded per-example forward.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import pytest

from fedlora_jax.adapters.base import AdapterConfig
from fedlora_jax.adapters.tree import init_adapters
from fedlora_jax.eval.harness import EvalExample, evaluate
from fedlora_jax.eval.report import ExampleScore, build_report, render_markdown
from fedlora_jax.logging import round_line
from fedlora_jax.model import llama
from fedlora_jax.model.convert import load_hf_folder
from fedlora_jax.model.loss import lm_loss
from fedlora_jax.model.tokenizer import load_tokenizer
from fedlora_jax.runner import eval_metrics


def _s(cid: int, rouge: float, nll: float, n: int) -> ExampleScore:
    return ExampleScore(cid, "c", rouge, 0.0, nll, n)


# Client 0: personal loss (2+4)/(1+2) = 2.0, global (3+6)/(1+2) = 3.0 -> gain -1.0;
#           ROUGE-L personal (0.5+0.3)/2 = 0.4, global (0.1+0.1)/2 = 0.1 -> +0.3.
# Client 1: personal loss 4/2 = 2.0, global 3/2 = 1.5 -> +0.5; ROUGE-L 0.2 - 0.6 -> -0.4.
PERSONAL = [_s(0, 0.5, 2.0, 1), _s(0, 0.3, 4.0, 2), _s(1, 0.2, 4.0, 2)]
GLOBAL = [_s(0, 0.1, 3.0, 1), _s(0, 0.1, 6.0, 2), _s(1, 0.6, 3.0, 2)]


def test_gain_by_hand() -> None:
    gain = build_report(GLOBAL, PERSONAL)["personal_gain"]
    assert not gain["personal_is_global"]
    assert gain["per_client"][0] == pytest.approx({"loss": -1.0, "rouge_l": 0.3})
    assert gain["per_client"][1] == pytest.approx({"loss": 0.5, "rouge_l": -0.4})
    # loss gains {-1, 0.5}: mean -0.25, population std 0.75; one client of two gains (loss < 0).
    assert gain["summary"]["loss"] == pytest.approx(
        {"mean": -0.25, "std": 0.75, "min": -1.0, "max": 0.5, "share_gain": 0.5}
    )
    assert gain["summary"]["rouge_l"] == pytest.approx(
        {"mean": -0.05, "std": 0.35, "min": -0.4, "max": 0.3, "share_gain": 0.5}
    )


def test_personal_is_global_gain_is_exactly_zero() -> None:
    gain = build_report(GLOBAL, GLOBAL, personal_adapter="global")["personal_gain"]
    assert gain["personal_is_global"]
    assert all(v == 0.0 for g in gain["per_client"].values() for v in g.values())
    assert gain["summary"]["loss"]["share_gain"] == 0.0
    report = build_report(GLOBAL, GLOBAL, personal_adapter="global")
    assert "exactly 0" in render_markdown(json.loads(json.dumps(report)))


def test_no_gain_without_both_sections_and_rows_must_match() -> None:
    assert build_report(None, PERSONAL)["personal_gain"] is None
    assert build_report(GLOBAL, None)["personal_gain"] is None
    with pytest.raises(ValueError, match="client 1 has 1 personal rows but 2 global rows"):
        build_report(GLOBAL + [_s(1, 0.0, 1.0, 1)], PERSONAL)


def test_label_and_gain_reach_markdown_and_metrics() -> None:
    label = "global (A + mean B; evaluation only)"
    report = json.loads(json.dumps(build_report(GLOBAL, PERSONAL, global_label=label)))
    md = render_markdown(report)
    assert f"| {label} |" in md and f"personal − {label}" in md
    assert "| loss | -0.2500 | 0.7500 | -1.0000 | 0.5000 | 0.5000 |" in md
    row = eval_metrics(report)
    assert row["global/label"] == label
    assert row["gain/loss/mean"] == pytest.approx(-0.25)
    assert row["gain/rouge_l/share_gain"] == pytest.approx(0.5)
    assert f"| {label} rouge_l 0.2667 loss 2.4000 |" in round_line(1, 1, row)


def test_fedsa_lora_labels_its_global_model() -> None:
    from fedlora_jax import algorithms
    from fedlora_jax.algorithms import ClientTraining
    from fedlora_jax.federated.context import RoundInfo
    from fedlora_jax.model.config import LlamaConfig

    cfg = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=4)  # fmt: skip
    training = ClientTraining(model=cfg, adapter=AdapterConfig(kind="lora", r=2, targets="qv"))
    info = RoundInfo(jnp.int32(0), jax.random.key(0), 1, 2)
    for name, label in [
        ("fedsa_lora", "global (A + mean B; evaluation only)"),
        ("fedit", "global"),
    ]:
        alg = algorithms.get(name)(training)
        server, clients = alg.init(jax.random.key(0), None, 2)
        assert alg.models(server, clients, info).global_label == label


# ---------------------------------------------------------------- the real harness

ADAPTER = AdapterConfig(kind="lora", r=2, alpha=4.0, targets="qv")
TEXTS = [[("Once upon a time", " there was a girl."), ("The dog", " ran fast.")],
         [("Tom had a", " red ball."), ("She was very", " happy.")]]  # fmt: skip


def _noisy(cfg, seed: int) -> dict:
    tree = init_adapters(jax.random.PRNGKey(seed), cfg, ADAPTER)
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(50 + seed), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [x + 0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)],
    )


def test_harness_gain_against_direct_forward(stories_dir: pathlib.Path) -> None:
    cfg, base = load_hf_folder(stories_dir)
    tok = load_tokenizer(stories_dir)
    eos = tok.eos_token_id
    splits = []
    for pairs in TEXTS:
        split = []
        for prompt, response in pairs:
            p = tok(prompt).input_ids
            r = tok(response, add_special_tokens=False).input_ids + [eos]
            split.append(EvalExample(tuple(p), (response.strip(),), tuple(p + r),
                                     (0,) * len(p) + (1,) * len(r), "c"))  # fmt: skip
        splits.append(split)
    glob, other = _noisy(cfg, 0), _noisy(cfg, 1)
    personal = jax.tree.map(lambda a, b: jnp.stack([a, b]), glob, other)  # client 0 = global
    report = evaluate(base, glob, personal, splits, cfg=cfg, adapter_cfg=ADAPTER, tokenizer=tok,
                      max_new_tokens=2, batch_size=2)  # fmt: skip

    @jax.jit
    def nll(adapters, tokens, mask):
        logits = llama.apply(base, adapters, tokens, jnp.ones_like(tokens), cfg=cfg,
                             adapter_cfg=ADAPTER)  # fmt: skip
        return lm_loss(logits, tokens, mask)

    def loss(adapters, split) -> float:
        sums = [nll(adapters, jnp.asarray([e.tokens]), jnp.asarray([e.loss_mask])) for e in split]
        return float(sum(s for s, _ in sums) / sum(n for _, n in sums))

    gain = report["personal_gain"]["per_client"]
    assert gain[0]["loss"] == pytest.approx(0.0, abs=1e-6)
    assert gain[0]["rouge_l"] == pytest.approx(0.0, abs=1e-9)
    expected = loss(other, splits[1]) - loss(glob, splits[1])
    assert abs(expected) > 1e-3  # the adapters differ, so the test can fail
    assert gain[1]["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
