"""Baselines: each aggregate against numpy on hand-made uploads, models(), uploads hold adapter
leaves only, and one real round each on stories260K (first 2 layers)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_engine import SIZES, STEPS, N, assert_trees_close, make_batches, tiny_stories

from fedlora_jax.adapters import AdapterConfig, init_adapters
from fedlora_jax.algorithms import ClientTraining, get, names
from fedlora_jax.federated import engine as E

BASELINES = ("fedit", "ffa_lora", "fedsa_lora", "local_only", "centralized")
CONFIG = E.EngineConfig(clients_per_round=3, seed=3)


@pytest.fixture(scope="module")
def model(stories_dir):
    return tiny_stories(stories_dir)


@pytest.fixture(scope="module")
def training(model):
    return ClientTraining(model=model[0], adapter=AdapterConfig(r=2), local_steps=STEPS, lr=1e-2)


def stacked_like(tree, k, seed):
    """k random rows shaped like ``tree`` (hand-made uploads)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.normal(size=(k, *np.shape(x))).astype(np.float32), tree)


def np_fedavg(stacked, w):
    w = np.asarray(w, np.float64)
    keep = w > 0
    return jax.tree.map(lambda u: np.tensordot(w[keep] / w[keep].sum(), u[keep], axes=1), stacked)


WEIGHTS = np.array([2.0, 0.0, 6.0], np.float32)  # client 1 excluded this round
IDS = jnp.array([0, 2, 3])
INFO = E.RoundInfo(jnp.int32(0), jax.random.key(0), None, N)


def poison_excluded(stacked):
    return jax.tree.map(lambda u: jnp.asarray(u).at[1].set(jnp.nan), stacked)


def upload_shape(alg, base, server, clients):
    phase = alg.phases[0]
    row = jax.tree.map(lambda x: x[0], clients)
    toks = jnp.zeros((phase.steps, 2, 8), jnp.int32)
    batch = {"tokens": toks, "loss_mask": toks, "attn_mask": toks}
    payload = phase.broadcast(server, IDS, INFO)
    key = jax.random.PRNGKey(0)
    return jax.eval_shape(phase.client_update, base, payload, row, batch, key, INFO)[0]


def test_registry_lists_the_baselines():
    assert set(BASELINES) <= set(names())
    with pytest.raises(ValueError, match="algorithm.name='fedavg' is not known; allowed: "):
        get("fedavg")


def test_fedit_aggregate_is_fedavg_of_A_and_B(training):
    alg = get("fedit")(training)
    server, _ = alg.init(jax.random.PRNGKey(0), None, N)
    uploads = stacked_like(server.params, 3, 1)
    got = alg.phases[0].aggregate(server, poison_excluded(uploads), WEIGHTS, IDS, INFO)
    assert_trees_close(got.params, np_fedavg(uploads, WEIGHTS))


def test_ffa_lora_aggregates_B_and_keeps_the_seed(training):
    alg = get("ffa_lora")(training)
    server, clients = alg.init(jax.random.PRNGKey(0), None, N)
    uploads = stacked_like(server.params, 3, 2)
    assert {p[-1].key for p, _ in jax.tree_util.tree_leaves_with_path(uploads)} == {"B"}
    got = alg.phases[0].aggregate(server, poison_excluded(uploads), WEIGHTS, IDS, INFO)
    assert_trees_close(got.params, np_fedavg(uploads, WEIGHTS))
    np.testing.assert_array_equal(got.init_key, server.init_key)
    # A is the init A of the shared seed, identical for every client, and B starts at 0.
    models = alg.models(got, clients, INFO)
    ref = init_adapters(server.init_key, training.model, training.adapter)
    leaf = models.global_["layers"]["0"]["attn"]["q_proj"]
    np.testing.assert_array_equal(leaf["A"], ref["layers"]["0"]["attn"]["q_proj"]["A"])
    assert models.personal is None and models.personal_is_global


def test_fedsa_lora_aggregates_A_and_weights_global_B(training):
    alg = get("fedsa_lora")(training)
    server, clients = alg.init(jax.random.PRNGKey(0), None, N)
    uploads = stacked_like(server.params, 3, 3)
    got = alg.phases[0].aggregate(server, poison_excluded(uploads), WEIGHTS, IDS, INFO)
    assert_trees_close(got.params, np_fedavg(uploads, WEIGHTS))
    np.testing.assert_array_equal(got.seen, [2.0, 0.0, 0.0, 6.0])  # excluded: not recorded
    own_B = stacked_like(jax.tree.map(lambda x: x[0], clients.personal), N, 4)
    clients = clients.replace(personal=own_B)
    models = alg.models(got, clients, INFO)
    global_adapters, personal = models.global_, models.personal
    assert not models.personal_is_global
    expected_B = np_fedavg(own_B, np.array([2.0, 0.0, 0.0, 6.0]))
    q = ("layers", "0", "attn", "q_proj")

    def at(tree, path=q):
        for p in path:
            tree = tree[p]
        return tree

    np.testing.assert_allclose(at(global_adapters)["B"], at(expected_B)["B"], rtol=1e-6)
    np.testing.assert_allclose(at(global_adapters)["A"], at(got.params)["A"])
    np.testing.assert_array_equal(at(personal)["B"], at(own_B)["B"])
    np.testing.assert_array_equal(at(personal)["A"][3], at(got.params)["A"])
    # before any aggregation every client counts equally
    uniform = alg.models(server, clients, INFO).global_
    np.testing.assert_allclose(at(uniform)["B"], np.mean(at(own_B)["B"], 0), rtol=1e-6)


def test_kind_checks_are_named(training):
    dec = dataclasses.replace(training, adapter=AdapterConfig(kind="decomposed", r=2))
    for name in ("ffa_lora", "fedsa_lora"):
        msg = f"adapter.kind='decomposed' is not supported by {name}"
        with pytest.raises(ValueError, match=msg):
            get(name)(dec)
    with pytest.raises(ValueError, match="clients_per_round=0"):
        get("centralized")(training, clients_per_round=0)


@pytest.mark.parametrize("name", BASELINES)
def test_uploads_hold_adapter_leaves_only(name, training, model):
    alg = get(name)(training)
    server, clients = alg.init(jax.random.PRNGKey(0), model[1], N)
    upload = upload_shape(alg, model[1], server, clients)
    adapters = init_adapters(jax.random.PRNGKey(0), training.model, training.adapter)
    shapes = {
        jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(adapters)
    }
    for path, leaf in jax.tree_util.tree_leaves_with_path(upload):
        key = jax.tree_util.keystr(path)
        assert key in shapes and leaf.shape == shapes[key], key
    expected_keys = {
        "fedit": {"A", "B"},
        "ffa_lora": {"B"},
        "fedsa_lora": {"A"},
        "local_only": set(),
        "centralized": {"A", "B"},
    }[name]
    assert {p[-1].key for p, _ in jax.tree_util.tree_leaves_with_path(upload)} == expected_keys


@pytest.fixture(scope="module")
def rounds(model, training):
    """One real round of each baseline (except FedIT, covered by test_engine) from seed 0."""
    cfg, base = model
    out = {}
    for name in ("ffa_lora", "fedsa_lora", "local_only"):
        alg = get(name)(training)
        state0 = E.init_state(alg, base, N, seed=0)
        init = jax.tree.map(np.array, (state0.server_state, state0.client_states))
        state, metrics = E.run_round(alg, state0, base, make_batches(), SIZES, CONFIG)
        out[name] = (alg, init, state, metrics)
    return out


def test_ffa_lora_round_trains_B_only(rounds):
    alg, (server0, _), state, metrics = rounds["ffa_lora"]
    g0 = alg.models(server0, None, INFO).global_
    g1 = alg.models(state.server_state, state.client_states, INFO).global_
    q0, q1 = g0["layers"]["0"]["attn"]["q_proj"], g1["layers"]["0"]["attn"]["q_proj"]
    np.testing.assert_array_equal(q1["A"], q0["A"])
    assert float(jnp.abs(q1["B"]).max()) > 0 and not np.any(q0["B"])
    b_bytes = (64 * 2 + 32 * 2) * 2 * 4  # q and v B matrices, 2 layers, float32
    assert metrics["comm/up_bytes_per_client"] == b_bytes
    assert metrics["comm/down_bytes_per_client"] == b_bytes + 8  # + the shared seed


def test_fedsa_lora_round_keeps_B_local(rounds):
    alg, (_, clients0), state, metrics = rounds["fedsa_lora"]
    ids = metrics["clients"]
    personal = alg.models(state.server_state, state.client_states, INFO).personal
    q = personal["layers"]["1"]["attn"]["v_proj"]
    assert np.ptp(np.asarray(q["A"]), axis=0).max() == 0  # A shared by all clients
    B = np.asarray(q["B"])
    assert np.abs(B[ids[0]] - B[ids[1]]).max() > 0  # each sampled client has its own B
    unsampled = sorted(set(range(N)) - set(ids))
    np.testing.assert_array_equal(
        B[unsampled], np.asarray(clients0.personal["layers"]["1"]["attn"]["v_proj"]["B"])[unsampled]
    )
    a_bytes = (2 * 64 + 2 * 64) * 2 * 4
    assert metrics["comm/up_bytes_per_client"] == a_bytes == metrics["comm/down_bytes_per_client"]


def test_local_only_round_communicates_nothing(rounds):
    alg, (_, clients0), state, metrics = rounds["local_only"]
    models = alg.models(state.server_state, state.client_states, INFO)
    g, personal = models.global_, models.personal
    assert g is None
    assert metrics["comm/up_bytes"] == 0 and metrics["comm/down_bytes"] == 0
    A = np.asarray(personal["layers"]["0"]["attn"]["q_proj"]["A"])
    A0 = np.asarray(clients0.personal["layers"]["0"]["attn"]["q_proj"]["A"])
    ids = metrics["clients"]
    assert np.abs(A[ids[0]] - A[ids[1]]).max() > 0
    unsampled = sorted(set(range(N)) - set(ids))
    np.testing.assert_array_equal(A[unsampled], A0[unsampled])


def test_centralized_trains_pooled_data_with_the_same_budget(model, training):
    cfg, base = model
    alg = get("centralized")(training, clients_per_round=3)
    assert alg.pooled_data and alg.phases[0].steps == 3 * STEPS
    state = E.init_state(alg, base, N, seed=0)
    assert state.server_state.seen.shape == (1,)  # one pooled client
    full = make_batches()
    pooled = {k: v[:3].reshape(1, 3 * STEPS, *v.shape[2:]) for k, v in full.items()}
    state, metrics = E.run_round(alg, state, base, pooled, SIZES, CONFIG)
    assert metrics["clients"] == [0] and metrics["comm/up_bytes"] == 0
    assert metrics["train/loss_last"] < metrics["train/loss_first"]
    models = E.models(alg, state, N)
    g, personal = models.global_, models.personal
    assert personal is None and models.personal_is_global
    assert float(jnp.abs(g["layers"]["0"]["attn"]["q_proj"]["B"]).max()) > 0
