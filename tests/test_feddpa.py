"""FedDPA-F: the dynamic weight α against numpy, the ``dual`` kind's forward at α = 0/1 against
the single LoRAs, the anchors at the last prompt token, the placement (the local adapter never
uploaded; the global one the data-weighted mean, numpy) and the bytes on two engine rounds of
stories260K (first 2 layers), and the harness's vmapped per-example weighting against a
per-client, per-example loop on the full stories260K.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_engine import SIZES, STEPS, N, make_batches, tiny_stories

from fedlora_jax.adapters import AdapterConfig, get_kind, init_adapters
from fedlora_jax.adapters.dual import ANCHORS, condition, dynamic_weight, with_mix
from fedlora_jax.algorithms import ClientTraining, get
from fedlora_jax.algorithms.base import OptionsError
from fedlora_jax.algorithms.feddpa import anchor_states, dual_tree
from fedlora_jax.eval.harness import EvalExample, evaluate, strip_at_eos
from fedlora_jax.federated import engine as E
from fedlora_jax.model import llama
from fedlora_jax.model.convert import load_hf_folder
from fedlora_jax.model.generate import generate, left_pad
from fedlora_jax.model.loss import lm_loss
from fedlora_jax.model.tokenizer import load_tokenizer

DUAL = AdapterConfig(kind="dual", r=2, alpha=4.0)
LORA = dataclasses.replace(DUAL, kind="lora")
CONFIG = E.EngineConfig(clients_per_round=3, seed=3)
Q = ("layers", "0", "attn", "q_proj")


def at(tree, path=Q):
    for p in path:
        tree = tree[p]
    return tree


def np_alpha(h, anchors, valid, w) -> np.ndarray:
    """The paper's α per row of h: w · mean over the valid anchors of the cosine similarity."""
    h, anchors = np.asarray(h, np.float64), np.asarray(anchors, np.float64)
    out = []
    for e in h:
        sims = [
            e @ a / (np.linalg.norm(e) * np.linalg.norm(a))
            for a, ok in zip(anchors, valid, strict=True)
            if ok
        ]
        out.append(w * np.mean(sims) if sims else 0.0)
    return np.array(out)


def perturbed(model_cfg, seed: int, adapter=LORA) -> dict:
    """A LoRA with non-zero B (a fresh B = 0 would make every adapter the base model)."""
    tree = init_adapters(jax.random.PRNGKey(seed), model_cfg, adapter)
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(100 + seed), len(leaves))
    noisy = [x + 0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, noisy)


# ----------------------------------------------------------------------------- α and the kind


def test_dynamic_weight_is_the_papers_formula_against_numpy():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(4, 6)).astype(np.float32)
    anchors = rng.normal(size=(5, 6)).astype(np.float32)
    anchors[1] = 0.7 * h[2]  # an anchor parallel to example 2
    valid = np.array([1, 1, 0, 1, 1], np.float32)  # anchor 2 is a padding row
    got = dynamic_weight(jnp.asarray(h), {"h": anchors, "valid": valid, "max_weight": 0.5})
    np.testing.assert_allclose(got, np_alpha(h, anchors, valid, 0.5), rtol=1e-5, atol=1e-6)
    none = {"h": anchors, "valid": np.zeros(5, np.float32), "max_weight": 0.5}
    np.testing.assert_array_equal(dynamic_weight(jnp.asarray(h), none), np.zeros(4))


def test_dual_leaf_mixes_the_two_loras_against_numpy():
    rng = np.random.default_rng(1)
    shapes = {"A": (2, 6), "B": (5, 2), "A_l": (2, 6), "B_l": (5, 2)}
    leaf = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    x = rng.normal(size=(3, 4, 6)).astype(np.float32)
    s = DUAL.scale
    g, loc = s * x @ leaf["A"].T @ leaf["B"].T, s * x @ leaf["A_l"].T @ leaf["B_l"].T
    kind = get_kind("dual")
    got = kind.apply({**leaf, "mix": np.float32(0.3)}, jnp.asarray(x), DUAL, None)
    np.testing.assert_allclose(got, 0.3 * g + 0.7 * loc, rtol=1e-5, atol=1e-5)
    mix = np.array([1.0, 0.0, -0.25], np.float32)[:, None, None]  # one weight per example
    got = kind.apply({**leaf, "mix": mix}, jnp.asarray(x), DUAL, None)
    np.testing.assert_allclose(got, mix * g + (1 - mix) * loc, rtol=1e-5, atol=1e-5)
    dw = kind.delta_weight({**leaf, "mix": np.float32(0.3)}, DUAL)
    want = s * (0.3 * leaf["B"] @ leaf["A"] + 0.7 * leaf["B_l"] @ leaf["A_l"]).T
    np.testing.assert_allclose(dw, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="per-example mix has no single"):
        kind.delta_weight({**leaf, "mix": mix}, DUAL)
    with pytest.raises(ValueError, match="needs 'mix'"):
        kind.apply(leaf, jnp.asarray(x), DUAL, None)


@pytest.fixture(scope="module")
def model(stories_dir):
    return tiny_stories(stories_dir)


def test_combined_forward_at_alpha_one_and_zero_is_each_adapter_alone(model):
    cfg, base = model
    g, loc = perturbed(cfg, 0), perturbed(cfg, 1)
    tokens = jnp.asarray(np.random.default_rng(2).integers(3, 500, (2, 9)), jnp.int32)
    mask = jnp.ones_like(tokens)

    def forward(adapters, adapter_cfg):
        return llama.apply(base, adapters, tokens, mask, cfg=cfg, adapter_cfg=adapter_cfg)

    both = dual_tree(g, loc)
    alone_g, alone_l = forward(g, LORA), forward(loc, LORA)
    assert float(jnp.max(jnp.abs(alone_g - alone_l))) > 1e-2  # the two adapters differ
    np.testing.assert_allclose(forward(with_mix(both, 1.0), DUAL), alone_g, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(forward(with_mix(both, 0.0), DUAL), alone_l, rtol=1e-6, atol=1e-6)
    per_example = with_mix(both, jnp.array([1.0, 0.0])[:, None, None])
    out = forward(per_example, DUAL)
    np.testing.assert_allclose(out[0], alone_g[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[1], alone_l[1], rtol=1e-6, atol=1e-6)


def test_anchors_are_the_last_prompt_token_under_the_local_adapter(model):
    """Each row's anchor = the hidden state of its prompt alone (the tokens before the first loss
    token) at its last token; a row without loss tokens and rows beyond the batch are invalid."""
    cfg, base = model
    loc = perturbed(cfg, 3)
    rng = np.random.default_rng(4)
    tokens = rng.integers(3, 500, (2, 2, 12)).astype(np.int32)  # [steps, batch, seq]
    loss_mask = np.zeros_like(tokens)
    starts = [[5, 3], [7, None]]
    for s, row in enumerate(starts):
        for b, p in enumerate(row):
            if p is not None:
                loss_mask[s, b, p:] = 1
    batches = {"tokens": tokens, "loss_mask": loss_mask, "attn_mask": np.ones_like(tokens)}
    training = ClientTraining(model=cfg, adapter=LORA)
    h, valid = anchor_states(base, loc, batches, 6, training)
    np.testing.assert_array_equal(valid, [1, 1, 1, 0, 0, 0])
    for i, p in enumerate([5, 3, 7]):
        prompt = jnp.asarray(tokens.reshape(4, 12)[i : i + 1, :p])
        want = llama.hidden(base, loc, prompt, jnp.ones_like(prompt), cfg=cfg, adapter_cfg=LORA)
        np.testing.assert_allclose(h[i], want[0, -1], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(h[3:], 0.0)


def test_condition_sets_alpha_per_example_and_keeps_a_global_tree(model):
    cfg, base = model
    g, loc = perturbed(cfg, 0), perturbed(cfg, 1)
    anchors = np.random.default_rng(5).normal(size=(3, cfg.hidden_size)).astype(np.float32)
    tree = dual_tree(g, loc)
    tree[ANCHORS] = {"h": anchors, "valid": np.ones(3, np.float32), "max_weight": 0.5}
    prompts = [[1, 40, 41, 42], [1, 7, 300]]
    tokens, mask = left_pad(prompts, 0)
    out = condition(
        base,
        tree,
        jnp.asarray(tokens),
        jnp.asarray(mask),
        cfg=cfg,
        adapter_cfg=DUAL,
        compute_dtype=jnp.float32,
    )
    assert ANCHORS not in out
    e = [
        llama.hidden(
            base, loc, jnp.asarray([p]), jnp.ones((1, len(p)), jnp.int32), cfg=cfg, adapter_cfg=LORA
        )[0, -1]
        for p in prompts
    ]
    want = np_alpha(np.stack(e), anchors, np.ones(3), 0.5)
    np.testing.assert_allclose(at(out)["mix"][:, 0, 0], want, rtol=1e-5, atol=1e-6)
    glob = with_mix(dual_tree(g, g), 1.0)
    assert (
        condition(base, glob, tokens, mask, cfg=cfg, adapter_cfg=DUAL, compute_dtype=jnp.float32)
        is glob
    )


# ----------------------------------------------------------------------------- the algorithm


@pytest.fixture(scope="module")
def training(model):
    return ClientTraining(model=model[0], adapter=DUAL, local_steps=STEPS, lr=1e-2)


def test_bad_options_and_kind_are_one_line(training):
    with pytest.raises(OptionsError, match="max_weight=2.0 must be in"):
        get("feddpa")(training, max_weight=2.0)
    with pytest.raises(OptionsError, match="instances=0 must be >= 1"):
        get("feddpa")(training, instances=0)
    with pytest.raises(ValueError, match="not supported by feddpa; allowed: dual"):
        get("feddpa")(dataclasses.replace(training, adapter=LORA))


@pytest.fixture(scope="module")
def two_rounds(model, training):
    """Two engine rounds, 3 of 4 clients each (round 0: 0, 1, 3; round 1: 0, 1, 2)."""
    _, base = model
    alg = get("feddpa")(training, instances=3)
    state = E.init_state(alg, base, N, seed=0)
    states, metrics = [jax.tree.map(np.array, state)], []  # run_round donates its input
    for r in range(2):
        state, m = E.run_round(alg, state, base, make_batches(r), SIZES, CONFIG)
        states.append(jax.tree.map(np.array, state))
        metrics.append(m)
    return alg, states, metrics


def test_upload_is_the_global_adapter_only(model, two_rounds):
    """The global phase uploads A, B whatever the client's local adapter holds (bitwise); the
    finetune phase uploads nothing and aggregates nothing."""
    _, base = model
    alg, states, _ = two_rounds
    state = states[1]
    ids = jnp.array([0])
    info = E.RoundInfo(jnp.int32(1), jax.random.key(0), 2, N)
    row = jax.tree.map(lambda x: x[0], state.client_states)
    junk = row.replace(local=jax.tree.map(lambda x: x + 1.0, row.local), anchors=row.anchors + 1.0)
    batch = jax.tree.map(lambda x: jnp.asarray(x[0]), make_batches(7))
    global_, local = alg.phases
    payload = global_.broadcast(state.server_state, ids, info)
    key = jax.random.key(1)
    up, _, _ = global_.client_update(base, payload, row, batch, key, info)
    up_junk, _, _ = global_.client_update(base, payload, junk, batch, key, info)
    assert set(at(up)) == {"A", "B"} and set(up["layers"]["0"]["attn"]) == {"q_proj", "v_proj"}
    jax.tree.map(np.testing.assert_array_equal, up, up_junk)
    nothing, _, _ = local.client_update(
        base, local.broadcast(state.server_state, ids, info), row, batch, key, info
    )
    assert nothing == {} and local.aggregate is None


def test_global_adapter_is_the_weighted_mean_of_the_uploads(model, training, two_rounds):
    """Round 0 against numpy: Σ_k p_k θ_g,k over the sampled clients, each θ_g,k from the
    global phase's client update run alone; and equal to FedIT's global on the same round."""
    _, base = model
    alg, states, metrics = two_rounds
    ids = metrics[0]["clients"]
    assert ids == [0, 1, 3]
    batches = make_batches(0)
    info = E.RoundInfo(jnp.int32(0), jax.random.key(0), 2, N)
    phase = alg.phases[0]
    payload = phase.broadcast(states[0].server_state, jnp.asarray(ids), info)
    uploads = []
    for k in ids:
        row = jax.tree.map(lambda x, k=k: x[k], states[0].client_states)
        batch = jax.tree.map(lambda x, k=k: jnp.asarray(x[k]), batches)
        up, _, _ = phase.client_update(base, payload, row, batch, jax.random.key(k), info)
        uploads.append(up)
    w = SIZES[ids] / SIZES[ids].sum()
    want = jax.tree.map(
        lambda *u: np.tensordot(w, np.stack([np.asarray(x, np.float64) for x in u]), 1), *uploads
    )
    got = states[1].server_state.params
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
    assert float(np.max(np.abs(at(got)["B"]))) > 0  # it trained

    fedit = get("fedit")(dataclasses.replace(training, adapter=LORA))
    s = E.init_state(fedit, base, N, seed=0)
    s, _ = E.run_round(fedit, s, base, batches, SIZES, CONFIG)
    jax.tree.map(np.testing.assert_array_equal, got, s.server_state.params)


def test_local_adapter_is_finetuned_from_the_new_global_and_stays_home(two_rounds):
    _, states, metrics = two_rounds
    after = states[1]
    g = after.server_state.params
    for k in range(N):
        local = jax.tree.map(lambda x, k=k: np.asarray(x[k]), after.client_states.local)
        if k in metrics[0]["clients"]:  # fine-tuned from the aggregate: moved away from it
            assert float(np.max(np.abs(at(local)["B"] - at(g)["B"]))) > 0
            assert np.asarray(after.client_states.valid[k]).tolist() == [1.0, 1.0, 1.0]
        else:  # client 2 sat round 0 out: the initial adapter, no anchor
            init = states[0].client_states.local
            jax.tree.map(lambda a, b, k=k: np.testing.assert_array_equal(a, b[k]), local, init)
            assert float(np.sum(after.client_states.valid[k])) == 0.0
    assert metrics[0]["finetune/anchors"] == 3.0


def test_bytes_are_one_lora_up_and_the_held_download_counted_once(two_rounds):
    """Up: A, B (FedIT's). Down in round 0: the global phase's and the finetune phase's θ_g; in
    round 1 the global phase's payload is the one each returning client got last round, so only
    the new client (2 of 0, 1, 2) is counted for it."""
    _, states, metrics = two_rounds
    lora = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(states[0].server_state.params))
    assert metrics[0]["comm/up_bytes_per_client"] == lora
    assert metrics[0]["comm/down_bytes_per_client"] == 2 * lora
    assert metrics[1]["clients"] == [0, 1, 2]
    assert metrics[1]["comm/down_bytes_per_client"] == pytest.approx(lora * (1 + 1 / 3))
    assert metrics[1]["comm/up_bytes_per_client"] == lora


# ----------------------------------------------------------------------------- evaluation

MAX_NEW = 4
TEXTS = [
    [
        ("Once upon a time", " there was a girl."),
        ("The dog", " ran fast."),
        ("Lily liked to", " play outside."),
    ],
    [("Tom had a", " red ball."), ("One day, the", " sun was hot."), ("She was very", " happy.")],
]


@pytest.fixture(scope="module")
def full_model(stories_dir: pathlib.Path):
    return load_hf_folder(stories_dir)


@pytest.fixture(scope="module")
def tokenizer(stories_dir: pathlib.Path):
    return load_tokenizer(stories_dir)


@pytest.fixture(scope="module")
def clients_test(tokenizer) -> list[list[EvalExample]]:
    eos = tokenizer.eos_token_id
    out = []
    for pairs in TEXTS:
        split = []
        for prompt, response in pairs:
            p = tokenizer(prompt).input_ids
            r = tokenizer(response, add_special_tokens=False).input_ids + [eos]
            mask = (0,) * len(p) + (1,) * len(r)
            split.append(EvalExample(tuple(p), (response.strip(),), tuple(p + r), mask))
        out.append(split)
    return out


def test_vmapped_per_example_weighting_equals_a_per_example_loop(
    full_model, clients_test, tokenizer
):
    """Both clients in one vmapped program (batch 2: a padded last batch) = for each client and
    each example alone: α from the unpadded prompt's representation (numpy formula), the dual
    adapter at that α, an unbatched loss and an unbatched greedy generation."""
    cfg, base = full_model
    rng = np.random.default_rng(6)
    globals_ = [perturbed(cfg, 10), perturbed(cfg, 10)]
    locals_ = [perturbed(cfg, 11), perturbed(cfg, 12)]
    anchors = rng.normal(size=(2, 4, cfg.hidden_size)).astype(np.float32)
    valid = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float32)
    trees = [dual_tree(g, loc) for g, loc in zip(globals_, locals_, strict=True)]
    personal = jax.tree.map(lambda *x: jnp.stack(x), *trees)
    personal[ANCHORS] = {"h": anchors, "valid": valid, "max_weight": np.full(2, 0.5, np.float32)}
    report, preds = evaluate(
        base,
        None,
        personal,
        clients_test,
        cfg=cfg,
        adapter_cfg=DUAL,
        tokenizer=tokenizer,
        max_new_tokens=MAX_NEW,
        batch_size=2,
        return_predictions=True,
    )

    @jax.jit
    def nll(adapters, tokens, loss_mask):
        logits = llama.apply(
            base, adapters, tokens, jnp.ones_like(tokens), cfg=cfg, adapter_cfg=DUAL
        )
        return lm_loss(logits, tokens, loss_mask)

    alphas = []
    for i, split in enumerate(clients_test):
        total = count = 0.0
        texts = []
        for ex in split:
            prompt = jnp.asarray([ex.prompt_ids], jnp.int32)
            e = llama.hidden(
                base, locals_[i], prompt, jnp.ones_like(prompt), cfg=cfg, adapter_cfg=LORA
            )[0, -1]
            alpha = float(np_alpha(e[None], anchors[i], valid[i], 0.5)[0])
            alphas.append(alpha)
            tree = with_mix(dual_tree(globals_[i], locals_[i]), alpha)
            s, n = nll(tree, jnp.asarray([ex.tokens]), jnp.asarray([ex.loss_mask]))
            total, count = total + float(s), count + float(n)
            out, length = generate(
                base,
                tree,
                prompt,
                jnp.ones_like(prompt),
                cfg=cfg,
                adapter_cfg=DUAL,
                max_new_tokens=MAX_NEW,
            )
            ids = strip_at_eos(np.asarray(out)[0, : int(length[0])], cfg.eos_ids)
            texts.append(tokenizer.decode(ids).strip())
        assert report["personal"]["per_client"][i]["loss"] == pytest.approx(total / count, rel=1e-5)
        assert [r["prediction"] for r in preds["personal"] if r["client_id"] == i] == texts
    assert len({round(a, 4) for a in alphas}) == len(alphas)  # a different weight per example
