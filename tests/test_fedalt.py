"""FedALT: leave-one-out RoW against numpy (partial participation included), server copies,
frozen RoW and personal router on the client, A1/B1-only uplink, per-client downlink bytes, and
two engine rounds on stories260K (first 2 layers).

The mixer itself (softmax over 2 experts sums to 1 per token, fp32; RoW branch exactly zero
while B0 = 0, gradients included) is tested with the kind in tests/test_adapters.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_checkpoint import _assert_same
from test_engine import SIZES, STEPS, N, make_batches, tiny_stories

from fedlora_jax.adapters import AdapterConfig, label_tree
from fedlora_jax.algorithms import ClientTraining, get
from fedlora_jax.algorithms.base import merge_trees, select_keys
from fedlora_jax.algorithms.fedalt import (
    LABEL_RULE,
    ClientState,
    ServerState,
    rest_of_world,
    row_weights,
)
from fedlora_jax.algorithms.training import local_train, make_loss_fn, make_optimizer
from fedlora_jax.federated import engine as E

INFO = E.RoundInfo(jnp.int32(0), jax.random.key(0), None, 4)

ADAPTER = AdapterConfig(kind="mixture", r=2, alpha=8.0)
CONFIG = E.EngineConfig(clients_per_round=3, seed=3)
Q = ("layers", "0", "attn", "q_proj")
LEAF_KEYS = ("A0", "A1", "B0", "B1", "G")


def at(tree, path=Q):
    for p in path:
        tree = tree[p]
    return tree


def np_row(copies: np.ndarray, uploaded, c: int) -> np.ndarray:
    """Plain numpy RoW of client c: mean of the other uploaded clients' copies, else zeros."""
    others = [j for j in range(len(uploaded)) if j != c and uploaded[j]]
    if not others:
        return np.zeros_like(copies[0])
    return np.mean(np.asarray(copies, np.float64)[others], axis=0)


def hand_copies(n: int, seed: int) -> dict:
    """Server copies {A1, B1} for n clients on two modules (no model needed)."""
    rng = np.random.default_rng(seed)

    def leaf(d_out):
        return {
            "A1": rng.normal(size=(n, 2, 6)).astype(np.float32),
            "B1": rng.normal(size=(n, d_out, 2)).astype(np.float32),
        }

    return {"layers": {"0": {"attn": {"q_proj": leaf(6), "v_proj": leaf(4)}}}}


@pytest.fixture(scope="module")
def model(stories_dir):
    return tiny_stories(stories_dir)


@pytest.fixture(scope="module")
def training(model):
    return ClientTraining(model=model[0], adapter=ADAPTER, local_steps=STEPS, lr=1e-2)


# ----------------------------------------------------------------------------- RoW (no model)


@pytest.mark.parametrize(
    "uploaded",
    [
        [True, True, True, True, True],  # full participation: the official code's setting
        [True, False, True, False, True],  # partial: clients 1 and 3 have never uploaded
    ],
)
def test_rest_of_world_is_leave_one_out_mean_against_numpy(uploaded):
    copies = hand_copies(5, 0)
    ids = jnp.array([0, 1, 3, 4])
    row = rest_of_world(copies, jnp.array(uploaded), ids)
    for module in ("q_proj", "v_proj"):
        got, src = row["layers"]["0"]["attn"][module], copies["layers"]["0"]["attn"][module]
        assert set(got) == {"A0", "B0"}
        for k, c in enumerate(ids.tolist()):
            for name in ("A", "B"):
                want = np_row(src[f"{name}1"], uploaded, c)
                np.testing.assert_allclose(got[f"{name}0"][k], want, rtol=1e-6, atol=1e-6)


def test_rest_of_world_ignores_the_clients_own_and_never_uploaded_copies():
    copies = hand_copies(4, 1)
    uploaded = jnp.array([True, True, False, True])
    ids = jnp.arange(4)
    before = rest_of_world(copies, uploaded, ids)

    def shifted(client):
        out = jax.tree.map(lambda x: x.copy(), copies)
        for name in ("A1", "B1"):
            at(out)[name][client] += 100.0
        return rest_of_world(out, uploaded, ids)

    own, never = shifted(1), shifted(2)  # client 1's own copy; client 2 never uploaded
    for name in ("A0", "B0"):
        np.testing.assert_array_equal(at(own)[name][1], at(before)[name][1])
        np.testing.assert_array_equal(at(never)[name], at(before)[name])
        for c, n_others in ((0, 2), (2, 3), (3, 2)):  # everyone else sees client 1's change
            np.testing.assert_allclose(
                at(own)[name][c] - at(before)[name][c], 100.0 / n_others, rtol=1e-4
            )


def test_rest_of_world_is_zero_until_another_client_uploads():
    w = row_weights(jnp.array([False, False, False]), jnp.arange(3))
    assert not np.any(w)
    w = np.asarray(row_weights(jnp.array([False, True, False]), jnp.arange(3)))
    np.testing.assert_array_equal(w, [[0, 1, 0], [0, 0, 0], [0, 1, 0]])  # 1 alone sees nobody


# ----------------------------------------------------------------------------- server


def test_init_gives_independent_clients_and_an_all_zero_first_broadcast(training):
    alg = get("fedalt")(training)
    server, clients = alg.init(jax.random.PRNGKey(0), None, N)
    assert not np.any(server.uploaded) and clients.opt_state == {}
    ind = at(clients.individual)
    assert set(ind) == {"A1", "B1", "G"} and ind["A1"].shape == (N, 2, 64)
    assert not np.any(ind["B1"]) and np.abs(ind["A1"][0] - ind["A1"][1]).max() > 0
    assert np.abs(ind["G"][0] - ind["G"][1]).max() > 0
    payload = alg.phases[0].broadcast(server, jnp.array([0, 2, 3]), INFO)
    assert jax.tree.leaves(payload) and not any(np.any(x) for x in jax.tree.leaves(payload))
    assert at(payload)["A0"].shape == (3, 2, 64)
    persistent = dataclasses.replace(training, optimizer_state="persistent")
    _, clients = get("fedalt")(persistent).init(jax.random.PRNGKey(0), None, N)
    assert {x.shape[0] for x in jax.tree.leaves(clients.opt_state)} == {N}


def test_aggregate_keeps_latest_copies_and_skips_excluded_clients(training):
    alg = get("fedalt")(training)
    phase = alg.phases[0]
    server, clients = alg.init(jax.random.PRNGKey(0), None, N)
    rng = np.random.default_rng(0)

    def uploads(k):
        return jax.tree.map(
            lambda x: rng.normal(size=(k, *x.shape[1:])).astype(np.float32), server.individual
        )

    up1 = uploads(3)  # round 1: clients 0, 1, 2 take part
    s1 = phase.aggregate(server, up1, jnp.array([5.0, 1.0, 9.0]), jnp.array([0, 1, 2]), INFO)
    up2 = jax.tree.map(lambda u: u.copy(), uploads(3))  # round 2: 1, 2, 3; client 2 excluded
    at(up2)["A1"][1] = np.nan
    s2 = phase.aggregate(s1, up2, jnp.array([2.0, 0.0, 4.0]), jnp.array([1, 2, 3]), INFO)
    np.testing.assert_array_equal(s2.uploaded, [True, True, True, True])
    copies = at(s2.individual)
    for name in ("A1", "B1"):
        want = np.stack([at(up1)[name][0], at(up2)[name][0], at(up1)[name][2], at(up2)[name][2]])
        np.testing.assert_array_equal(copies[name], want)
    # the next broadcast uses every other client's latest copy, whoever took part last round
    payload = phase.broadcast(s2, jnp.array([0, 3]), INFO)
    for k, c in enumerate((0, 3)):
        np.testing.assert_allclose(
            at(payload)["B0"][k], np_row(want, [True] * 4, c), rtol=1e-6, atol=1e-6
        )
    # models(): no global model; personal = current RoW + the client's own A1, B1, G
    models = alg.models(s2, clients, INFO)
    global_adapters, personal = models.global_, models.personal
    assert global_adapters is None and not models.personal_is_global
    assert set(at(personal)) == set(LEAF_KEYS)
    np.testing.assert_array_equal(at(personal)["G"], at(clients.individual)["G"])
    np.testing.assert_allclose(
        at(personal)["A0"][1], np_row(copies["A1"], [True] * 4, 1), rtol=1e-6, atol=1e-6
    )


def test_wrong_adapter_kind_is_a_named_error(training):
    lora = dataclasses.replace(training, adapter=AdapterConfig(kind="lora", r=2))
    with pytest.raises(ValueError, match="adapter.kind='lora' is not supported by fedalt"):
        get("fedalt")(lora)


# ----------------------------------------------------------------------------- client


def test_client_trains_A1_B1_G_and_leaves_a_nonzero_RoW_bitwise_unchanged(model, training):
    cfg, base = model
    alg = get("fedalt")(training)
    _, clients = alg.init(jax.random.PRNGKey(0), None, N)
    rng = np.random.default_rng(1)
    own = select_keys(clients.individual, ("A1", "B1"))
    row = jax.tree.map(
        lambda x: rng.normal(size=x.shape[1:]).astype(np.float32) * 0.1,
        rest_of_world(own, jnp.ones(N, bool), jnp.arange(1)),
    )
    params = merge_trees(row, jax.tree.map(lambda x: x[0], clients.individual))

    def labels(tree):
        return label_tree(tree, LABEL_RULE)

    tx = make_optimizer(training, labels, STEPS)
    batches = {k: v[0] for k, v in make_batches().items() if k != "poison"}
    loss_fn = make_loss_fn(training)
    grads = jax.grad(
        lambda p: loss_fn(base, p, jax.tree.map(lambda x: x[0], batches), jax.random.PRNGKey(0))[0]
    )(params)
    assert np.abs(at(grads)["A0"]).max() > 0  # the RoW does receive gradient: it must be masked
    new, _, _ = local_train(
        loss_fn, base, params, tx, tx.init(params), batches, jax.random.PRNGKey(0), labels
    )
    for path in (Q, ("layers", "1", "attn", "v_proj")):
        for name in ("A0", "B0"):
            np.testing.assert_array_equal(at(new, path)[name], at(params, path)[name])
        for name in ("A1", "B1", "G"):
            assert np.abs(at(new, path)[name] - at(params, path)[name]).max() > 0, name


def test_upload_holds_A1_B1_only(model, training):
    cfg, base = model
    alg = get("fedalt")(training)
    server, clients = alg.init(jax.random.PRNGKey(0), None, N)
    phase = alg.phases[0]
    payload = jax.tree.map(lambda x: x[0], phase.broadcast(server, jnp.array([1]), INFO))
    row = jax.tree.map(lambda x: x[1], clients)
    toks = jnp.zeros((STEPS, 2, 8), jnp.int32)
    batch = {"tokens": toks, "loss_mask": toks, "attn_mask": toks}
    upload, state, _ = jax.eval_shape(
        phase.client_update, base, payload, row, batch, jax.random.PRNGKey(0), INFO
    )
    assert jax.tree.structure(upload) == jax.tree.structure(server.individual)
    assert {p[-1].key for p, _ in jax.tree_util.tree_leaves_with_path(upload)} == {"A1", "B1"}
    assert jax.tree.structure(state) == jax.tree.structure(row)  # G stays on the client


# ----------------------------------------------------------------------------- engine rounds


@pytest.fixture(scope="module")
def two_rounds(model, training):
    """Two engine rounds, 3 of 4 clients each (round 0: 0, 1, 3; round 1: 0, 1, 2)."""
    _, base = model
    alg = get("fedalt")(training)
    state = E.init_state(alg, base, N, seed=0)
    states = [jax.tree.map(np.array, state)]
    metrics = []
    for r in range(2):
        state, m = E.run_round(alg, state, base, make_batches(r), SIZES, CONFIG)
        states.append(jax.tree.map(np.array, state))
        metrics.append(m)
    return alg, states, metrics


def test_engine_rounds_keep_individual_LoRA_and_router_personal(two_rounds):
    alg, states, metrics = two_rounds
    assert [m["clients"] for m in metrics] == [[0, 1, 3], [0, 1, 2]]
    assert all(np.isfinite(m["train/loss"]) and m["train/excluded"] == [] for m in metrics)
    s0, s1, s2 = states
    np.testing.assert_array_equal(s1.server_state.uploaded, [True, True, False, True])
    np.testing.assert_array_equal(s2.server_state.uploaded, [True] * 4)
    for state in (s1, s2):  # the server's copy is exactly what the client keeps training
        ind, copies = at(state.client_states.individual), at(state.server_state.individual)
        up = state.server_state.uploaded
        for name in ("A1", "B1"):
            np.testing.assert_array_equal(ind[name][up], copies[name][up])
    # client 3 sat out round 1: its LoRA and router are untouched (never reset to an aggregate)
    for name in ("A1", "B1", "G"):
        np.testing.assert_array_equal(
            at(s2.client_states.individual)[name][3], at(s1.client_states.individual)[name][3]
        )
        for c in (0, 1):  # took part twice: trained on from its own round-1 result
            assert (
                np.abs(
                    at(s2.client_states.individual)[name][c]
                    - at(s1.client_states.individual)[name][c]
                ).max()
                > 0
            )
    # client 2 sat out round 0 (untouched) and trained in round 1
    for name in ("A1", "G"):
        ind = [at(s.client_states.individual)[name][2] for s in (s0, s1, s2)]
        np.testing.assert_array_equal(ind[1], ind[0])
        assert np.abs(ind[2] - ind[1]).max() > 0
    # personal models: each client's RoW is the leave-one-out mean of the server's copies
    models = E.models(alg, s2, N)
    g, personal = models.global_, models.personal
    assert g is None
    copies = at(s2.server_state.individual)
    for c in range(N):
        for name in ("A", "B"):
            np.testing.assert_allclose(
                at(personal)[f"{name}0"][c],
                np_row(copies[f"{name}1"], [True] * 4, c),
                rtol=1e-5,
                atol=1e-7,
            )


def test_downlink_is_one_RoW_per_client_and_uplink_one_LoRA(two_rounds):
    _, _, metrics = two_rounds
    lora_bytes = (2 * 64 + 64 * 2 + 2 * 64 + 32 * 2) * 2 * 4  # q, v; 2 layers; float32
    for m in metrics:
        assert m["comm/down_bytes_per_client"] == lora_bytes  # A0, B0: this client's RoW only
        assert m["comm/up_bytes_per_client"] == lora_bytes  # A1, B1
        assert m["comm/down_bytes"] == 3 * lora_bytes == m["comm/up_bytes"]


# ----------------------------------------------------------------------------- preset


def test_official_preset_mirrors_the_official_run():
    import pathlib

    from fedlora_jax.config import adapter_kind, load_config

    ni = pathlib.Path(__file__).resolve().parents[1] / "configs" / "natural_instructions.py"
    cfg = load_config(f"{ni}:fedalt")
    assert (cfg.algorithm.name, adapter_kind(cfg)) == ("fedalt", "mixture")
    assert (cfg.data.source, cfg.data.partition, cfg.data.num_clients) == (
        "natural_instructions",
        "task",
        8,
    )
    assert (cfg.adapter.r, cfg.adapter.alpha, cfg.adapter.targets) == (8, 32.0, "qv")
    assert (cfg.federated.rounds, cfg.federated.batch_size, cfg.eval.every) == (20, 8, 5)
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.optimizer_state) == (
        3e-4,
        "linear",
        "fresh",
    )
    baseline = load_config(f"{ni}:fedalt", ["algorithm.name=fedit"])
    assert adapter_kind(baseline) == "lora"


def test_official_preset_gives_8_clients_one_task_each(stories_dir):
    """The preset's data section, tokenised with stories260K: one shipped NI task per client,
    8 tasks spanning all 6 categories, 270 training rows each (300 minus 30 held out), so
    local_steps = 5 epochs x ceil(270 / 8) = 170."""
    import math
    import pathlib

    from transformers import AutoTokenizer

    from fedlora_jax.config import load_config
    from fedlora_jax.data import prepare_federated_data

    ni = pathlib.Path(__file__).resolve().parents[1] / "configs" / "natural_instructions.py"
    cfg = load_config(f"{ni}:fedalt")
    fd = prepare_federated_data(
        cfg.data.to_dict(), AutoTokenizer.from_pretrained(stories_dir), verbose=False
    )
    tasks = [
        {fd.examples[i].group for i in np.concatenate([c.train_rows, c.test.rows])}
        for c in fd.clients
    ]
    assert len(fd.clients) == 8 and all(len(t) == 1 for t in tasks)
    assert sorted(set().union(*tasks)) == sorted(cfg.data.include.split(","))
    assert len({ex.category for ex in fd.examples}) == 6
    assert [c.num_train for c in fd.clients] == [270] * 8
    assert cfg.federated.local_steps == 5 * math.ceil(270 / cfg.federated.batch_size)


def test_state_round_trips_through_a_checkpoint(two_rounds, tmp_path):
    from fedlora_jax.checkpoint import Checkpointer

    _, states, _ = two_rounds
    s0, _, s2 = states
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(2, s2, {"round": 2})
        ckpt.wait()
        restored, meta = ckpt.restore(s0)
    assert meta["round"] == 2 and restored.server_state.uploaded.dtype == bool
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored), s2)


def test_typed_states_and_a_round_through_a_checkpoint(model, two_rounds, tmp_path):
    """init gives the typed states (server copies and flags [N], client rows [N]); the state
    after one real round, saved and restored into a fresh init_state, is bitwise equal."""
    from fedlora_jax.checkpoint import Checkpointer

    alg, states, _ = two_rounds
    fresh = E.init_state(alg, model[1], N, seed=0)
    server, clients = fresh.server_state, fresh.client_states
    assert isinstance(server, ServerState) and isinstance(clients, ClientState)
    assert server.uploaded.shape == (N,) and server.uploaded.dtype == bool
    for tree, keys in ((server.individual, {"A1", "B1"}), (clients.individual, {"A1", "B1", "G"})):
        assert set(at(tree)) == keys and {x.shape[0] for x in jax.tree.leaves(tree)} == {N}
    assert clients.opt_state == {}  # optimizer_state = fresh
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, states[1], {"round": 1})
        ckpt.wait()
        restored, _ = ckpt.restore(fresh)
    assert isinstance(restored.server_state, ServerState)
    _assert_same(restored, states[1])
