"""FedLoRA-Optimizer: B_M = 0 start, phase routing, aggregation vs numpy, global vs personal
models, optimizer steps vs hand-computed Adam, and real rounds on stories260K (first 2 layers).

Decompose -> recompose round trips are covered by tests/test_adapters.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_checkpoint import _assert_same
from test_engine import SIZES, N, assert_trees_close, make_batches, tiny_stories

from fedlora_jax.adapters import AdapterConfig, get_kind, init_adapters
from fedlora_jax.algorithms import ClientTraining, get
from fedlora_jax.algorithms.base import select_keys
from fedlora_jax.algorithms.fedlora_optimizer import (
    COMPONENTS,
    SHARED,
    ClientState,
    ServerState,
    phase_optimizers,
)
from fedlora_jax.algorithms.training import local_train, make_loss_fn
from fedlora_jax.federated import engine as E

Q = ("layers", "0", "attn", "q_proj")
WEIGHTS = np.array([2.0, 0.0, 6.0], np.float32)  # client at row 1 excluded this round
IDS = jnp.array([0, 2, 3])
CONFIG = E.EngineConfig(clients_per_round=3, seed=3)


def at(tree, path=Q):
    for p in path:
        tree = tree[p]
    return tree


def leaves_by_key(tree):
    """{(module path..., component): array} for a decomposed adapter tree."""
    return {
        tuple(k.key for k in p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


@pytest.fixture(scope="module")
def model(stories_dir):
    return tiny_stories(stories_dir)


@pytest.fixture(scope="module")
def training(model):
    adapter = AdapterConfig(kind="decomposed", r=2, alpha=4.0)
    return ClientTraining(model=model[0], adapter=adapter, local_steps=2, lr=1e-2)


INFO = E.RoundInfo(jnp.int32(0), jax.random.key(0), None, N)


def batch_of(seed, steps=None):
    b = make_batches(seed)
    b = {k: v[0] for k, v in b.items() if k != "poison"}  # client 0: [steps, batch, seq]
    return b if steps is None else {k: v[:steps] for k, v in b.items()}


# ------------------------------------------------------------------------- construction


def test_option_errors_name_the_key(training):
    build = get("fedlora_optimizer")
    cases = [
        (
            {"local_phase": "last"},
            "algorithm.options.local_phase='last' is not allowed; allowed: every_round, final",
        ),
        ({"personal_bm": "x"}, "personal_bm='x' is not allowed"),
        ({"variant": "paper"}, "variant='paper' is not allowed"),
        ({"variant": "paper_literal"}, "needs adapter.init='paper_literal'"),
        ({"global_train": "A_D,C"}, "global_train='A_D,C' must be a non-empty subset"),
        ({"global_train": ("A_D",), "aggregate": ("A_D", "B_M")}, "must be a subset of global"),
        ({"rounds": 2}, "algorithm.options.rounds is not an option of fedlora_optimizer"),
        ({"global_steps": 0}, "global_steps=0 must be a positive integer"),
        ({"local_lr": -1.0}, "local_lr=-1.0 must be > 0"),
    ]
    for options, msg in cases:
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            build(training, **options)
    with pytest.raises(ValueError, match="adapter.kind='lora' is not supported"):
        build(dataclasses.replace(training, adapter=AdapterConfig(r=2)))


def test_phases_and_steps(training):
    alg = get("fedlora_optimizer")(training, global_steps=3, local_steps_personal=1)
    assert [(p.name, p.steps, p.aggregate is None) for p in alg.phases] == [
        ("global", 3, False),
        ("personal", 1, True),
    ]


# ------------------------------------------------------------------------- B_M = 0 start


def test_zero_bm_gives_zero_delta_yet_bm_gets_gradient(model, training):
    cfg, base = model
    adapters = init_adapters(jax.random.PRNGKey(0), cfg, training.adapter)
    kind = get_kind("decomposed")
    assert not np.any(kind.delta_weight(at(adapters), training.adapter))
    loss_fn = make_loss_fn(training)
    batch = jax.tree.map(lambda x: x[0], batch_of(0))
    key = jax.random.PRNGKey(1)
    base_loss, _ = loss_fn(base, {}, batch, key)
    (loss, _), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
        base, adapters, batch, key
    )
    np.testing.assert_allclose(loss, base_loss, rtol=1e-6)  # ΔW = 0: the base model's loss
    g = at(grads)
    assert float(jnp.abs(g["B_M"]).max()) > 1e-6
    for c in ("A_M", "A_D", "B_D"):  # B = 0 blocks them at the first step ...
        assert not np.any(g[c]), c
    # ... and one plain SGD step on B_M alone unblocks every component
    stepped = jax.tree_util.tree_map_with_path(
        lambda p, x, d: x - d if p[-1].key == "B_M" else x, adapters, grads
    )
    g2 = at(jax.grad(lambda a: loss_fn(base, a, batch, key)[0])(stepped))
    for c in COMPONENTS:
        assert float(jnp.abs(g2[c]).max()) > 1e-9, c


# ------------------------------------------------------------------------- optimizer routing


def np_adam(grads, lr, b1=0.9, b2=0.999, eps=1e-8):
    """Updates of plain Adam (bias-corrected) for a sequence of gradients."""
    m = v = 0.0
    out = []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        out.append(-lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps))
    return out


def adam_mu(state, label):
    return optax.tree_utils.tree_get(state.inner_states[label], "mu")


def test_optimizer_routing_matches_hand_computed_adam(training):
    plain = dataclasses.replace(training, grad_clip=0.0, optimizer_state="persistent")
    alg = get("fedlora_optimizer")(plain, global_lr=0.1, local_lr=0.01)
    server, clients = alg.init(jax.random.PRNGKey(0), None, N)
    # state structure: the global phase's Adam holds every component in its "shared" group, the
    # personal phase's Adam holds B_M only, in its "personal" group
    for name, label, held in (
        ("global_opt_state", "shared", COMPONENTS),
        ("personal_opt_state", "personal", ("B_M",)),
    ):
        state = getattr(clients, name)
        mu = at(adam_mu(state, label))
        assert {k for k, v in mu.items() if isinstance(v, jax.Array)} == set(held), name
        assert mu[held[0]].shape == (N, *at(server.adapters)[held[0]].shape)
        other = {"shared": "personal", "personal": "shared"}[label]
        assert all(isinstance(v, optax.MaskedNode) for v in at(adam_mu(state, other)).values())

    train_g = dataclasses.replace(plain, lr=0.1)
    train_l = dataclasses.replace(plain, lr=0.01)
    tx_g, _, tx_l, _ = phase_optimizers(train_g, train_l, COMPONENTS)
    params = server.adapters
    rng = np.random.default_rng(0)
    grads = [
        jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
        for _ in range(2)
    ]
    for tx, lr, moved in ((tx_g, 0.1, COMPONENTS), (tx_l, 0.01, ("B_M",))):
        state = tx.init(params)
        ups = []
        for g in grads:
            u, state = tx.update(g, state, params)
            ups.append(u)
        for c in COMPONENTS:
            got = [np.asarray(at(u)[c]) for u in ups]
            if c in moved:
                want = np_adam([np.asarray(at(g)[c], np.float64) for g in grads], lr)
                for x, y in zip(got, want, strict=True):
                    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-8)  # float32
            else:
                assert not any(np.any(x) for x in got), c


def test_personal_phase_training_changes_only_bm(model, training):
    """The personal phase's optimizer on the full adapter: B_M moves, every other leaf stays
    bitwise equal although its gradient is non-zero."""
    cfg, base = model
    alg = get("fedlora_optimizer")(training)
    server, _ = alg.init(jax.random.PRNGKey(0), base, N)
    params = jax.tree.map(lambda x: x + 0.1, server.adapters)  # B_M ≠ 0: all grads flow
    _, _, tx_l, labels_l = phase_optimizers(training, training, COMPONENTS)
    loss_fn = make_loss_fn(training)
    batches = batch_of(1)
    grads = jax.grad(
        lambda a: loss_fn(base, a, jax.tree.map(lambda x: x[0], batches), jax.random.PRNGKey(0))[0]
    )(params)
    assert float(jnp.abs(at(grads)["A_D"]).max()) > 0
    new, _, metrics = local_train(
        loss_fn, base, params, tx_l, tx_l.init(params), batches, jax.random.PRNGKey(0), labels_l
    )
    before, after = leaves_by_key(params), leaves_by_key(new)
    for k in before:
        if k[-1] == "B_M":
            assert np.abs(after[k] - before[k]).max() > 0, k
        else:
            np.testing.assert_array_equal(after[k], before[k], err_msg=str(k))
    assert np.isfinite(float(metrics["loss"]))


# ------------------------------------------------------------------------- aggregation, models


def np_fedavg(stacked, w):
    w = np.asarray(w, np.float64)
    keep = w > 0
    return jax.tree.map(
        lambda u: np.tensordot(w[keep] / w[keep].sum(), np.asarray(u)[keep], 1), stacked
    )


def stacked_like(tree, k, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.normal(size=(k, *np.shape(x))).astype(np.float32), tree)


@pytest.mark.parametrize("options", [{}, {"global_train": "A_D,B_M", "aggregate": "A_D"}])
def test_aggregate_matches_numpy(training, options):
    alg = get("fedlora_optimizer")(training, **options)
    server, _ = alg.init(jax.random.PRNGKey(0), None, N)
    aggregated = tuple(c for c in COMPONENTS if c in options.get("aggregate", COMPONENTS))
    uploads = stacked_like(select_keys(server.adapters, aggregated), 3, 1)
    poisoned = jax.tree.map(lambda u: jnp.asarray(u).at[1].set(jnp.nan), uploads)
    got = alg.phases[0].aggregate(server, poisoned, WEIGHTS, IDS, INFO)
    want = np_fedavg(uploads, WEIGHTS)
    for c in COMPONENTS:
        if c in aggregated:
            assert_trees_close(select_keys(got.adapters, (c,)), select_keys(want, (c,)))
        else:  # kept on the server bitwise
            np.testing.assert_array_equal(at(got.adapters)[c], at(server.adapters)[c])


def test_global_and_personal_models_differ_only_in_bm(training):
    alg = get("fedlora_optimizer")(training)
    server, clients = alg.init(jax.random.PRNGKey(0), None, N)
    server = server.replace(
        adapters=jax.tree.map(lambda x: x[0], stacked_like(server.adapters, 1, 2))
    )
    clients = clients.replace(
        B_M=stacked_like(jax.tree.map(lambda x: x[0], clients.B_M), N, 3),
        has_bm=jnp.array([True, False, True, False]),
    )
    models = alg.models(server, clients, INFO)
    g, personal = models.global_, models.personal
    assert g is server.adapters and not models.personal_is_global
    for path, x in leaves_by_key(personal).items():
        ref = np.asarray(at(g, path[:-1])[path[-1]])
        for i in range(N):
            if path[-1] in SHARED or not clients.has_bm[i]:
                np.testing.assert_array_equal(x[i], ref)
            else:
                np.testing.assert_array_equal(x[i], np.asarray(at(clients.B_M, path))[i])
                assert np.abs(x[i] - ref).max() > 0


# ------------------------------------------------------------------------- real rounds


def round_batches(seed, e_l):
    """Batches per phase name: global E_g = 2 steps, personal E_l steps."""
    b = make_batches(seed)
    del b["poison"]
    return {"global": b, "personal": {k: v[:, :e_l] for k, v in b.items()}}


@pytest.fixture(scope="module")
def default_round(model, training):
    cfg, base = model
    alg = get("fedlora_optimizer")(training, local_steps_personal=1, local_lr=5e-2)
    state0 = E.init_state(alg, base, N, seed=0)
    init = jax.tree.map(np.array, (state0.server_state, state0.client_states))
    state, metrics = E.run_round(alg, state0, base, round_batches(0, 1), SIZES, CONFIG)
    return alg, init, state, metrics


def test_engine_round_runs_both_phases(default_round):
    alg, (server0, clients0), state, metrics = default_round
    ids = metrics["clients"]
    for phase in ("global", "personal"):
        assert np.isfinite(metrics[f"{phase}/loss"]) and not metrics[f"{phase}/excluded"]
    assert metrics["global/aggregated"] and not metrics["personal/aggregated"]
    server = state.server_state
    for c in COMPONENTS:  # the global phase trains and aggregates all four components
        assert np.abs(at(server.adapters)[c] - at(server0.adapters)[c]).max() > 0, c
    has = np.asarray(state.client_states.has_bm)
    assert has[ids].all() and not has[sorted(set(range(N)) - set(ids))].any()
    models = E.models(alg, state, N)
    g, personal = models.global_, models.personal
    bm = np.asarray(at(personal)["B_M"])
    assert np.abs(bm[ids[0]] - bm[ids[1]]).max() > 0  # each client its own B_M
    assert np.abs(bm[ids[0]] - np.asarray(at(g)["B_M"])).max() > 0
    for c in SHARED:
        np.testing.assert_array_equal(np.asarray(at(personal)[c])[ids[0]], at(g)[c])
    # communication: the global phase sends the adapter down and up, the personal phase the new
    # global adapter down and nothing up
    nbytes = sum(x.nbytes for x in jax.tree.leaves(server0.adapters))
    assert metrics["comm/up_bytes_per_client"] == nbytes
    assert metrics["comm/down_bytes_per_client"] == 2 * nbytes


def test_typed_states_and_a_round_through_a_checkpoint(model, training, default_round, tmp_path):
    """init gives the typed states (the global adapter without a client axis, client rows [N]);
    the state after one real round, saved and restored into a fresh init_state, is bitwise
    equal."""
    from fedlora_jax.checkpoint import Checkpointer

    cfg, base = model
    alg, _, state, _ = default_round
    fresh = E.init_state(alg, base, N, seed=0)
    server, clients = fresh.server_state, fresh.client_states
    assert isinstance(server, ServerState) and isinstance(clients, ClientState)
    assert set(at(server.adapters)) == set(COMPONENTS)
    assert jax.tree.map(jnp.shape, server.adapters) == jax.tree.map(
        jnp.shape, init_adapters(jax.random.PRNGKey(0), cfg, training.adapter)
    )
    assert set(at(clients.B_M)) == {"B_M"}
    assert {x.shape[0] for x in jax.tree.leaves(clients.B_M)} == {N}
    assert clients.has_bm.shape == (N,) and clients.has_bm.dtype == bool
    assert clients.global_opt_state == {} == clients.personal_opt_state  # optimizer_state=fresh
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, state, {"round": 1})
        ckpt.wait()
        restored, _ = ckpt.restore(fresh)
    assert isinstance(restored.client_states, ClientState)
    _assert_same(restored, state)


def test_persistent_bm_is_the_start_of_the_next_personal_phase(model, training, default_round):
    """personal_bm=persistent starts from the client's own B_M; restart from the global one."""
    cfg, base = model
    alg, _, state, metrics = default_round
    client = metrics["clients"][0]
    row = jax.tree.map(lambda x: x[client], state.client_states)
    row = row.replace(B_M=jax.tree.map(lambda x: x + 1.0, row.B_M))  # far from the global B_M
    batches = {k: v[client] for k, v in round_batches(5, 1)["personal"].items()}
    key = jax.random.PRNGKey(0)
    restart = get("fedlora_optimizer")(
        training, local_steps_personal=1, local_lr=5e-2, personal_bm="restart"
    )
    outs = [
        a.phases[1].client_update(base, state.server_state, row, batches, key, INFO)[1].B_M
        for a in (alg, restart)
    ]
    own, shared = at(row.B_M)["B_M"], at(state.server_state.adapters)["B_M"]
    # Adam's first step moves each entry by <= lr: the start is recoverable entry-wise
    np.testing.assert_allclose(at(outs[0])["B_M"], own, atol=5e-2 + 1e-6)
    np.testing.assert_allclose(at(outs[1])["B_M"], shared, atol=5e-2 + 1e-6)
    assert np.abs(own - shared).min() > 0.5


def test_paper_literal_final_local_phase(model, training):
    """variant=paper_literal trains and aggregates only A_D; local_phase=final skips the personal
    phase until the last round (EngineConfig.rounds)."""
    cfg, base = model
    lit = dataclasses.replace(
        training, adapter=dataclasses.replace(training.adapter, init="paper_literal")
    )
    alg = get("fedlora_optimizer")(
        lit, variant="paper_literal", local_phase="final", local_steps_personal=1
    )
    state = E.init_state(alg, base, N, seed=0)
    with pytest.raises(ValueError, match="needs the run length: set EngineConfig.rounds"):
        E.run_round(alg, state, base, round_batches(0, 1), SIZES, CONFIG)
    state = E.init_state(alg, base, N, seed=0)  # the failed round consumed (donated) the state
    config = dataclasses.replace(CONFIG, rounds=2)
    server0 = jax.tree.map(np.array, state.server_state)
    state, m1 = E.run_round(alg, state, base, round_batches(0, 1), SIZES, config)
    a1 = jax.tree.map(np.array, state.server_state.adapters)
    for c in COMPONENTS:
        changed = np.abs(at(a1)[c] - at(server0.adapters)[c]).max() > 0
        assert changed == (c == "A_D"), c
    assert np.isnan(m1["personal/loss"]) and not np.asarray(state.client_states.has_bm).any()
    state, m2 = E.run_round(alg, state, base, round_batches(1, 1), SIZES, config)
    assert np.isfinite(m2["personal/loss"])
    assert np.asarray(state.client_states.has_bm)[m2["clients"]].all()


def test_final_local_phase_runs_after_a_round_without_valid_client(model, training):
    """The last round is known from RoundInfo, not from a counter that only advances when the
    server aggregates: a round where every client is excluded does not postpone the final
    personal phase."""
    cfg, base = model
    alg = get("fedlora_optimizer")(training, local_phase="final", local_steps_personal=1)
    glob = alg.phases[0]

    def nan_in_round_0(base, payload, state, batches, key, info):
        upload, state, metrics = glob.client_update(base, payload, state, batches, key, info)
        bad = jnp.where(info.round == 0, jnp.nan, 0.0)
        return jax.tree.map(lambda u: u + bad, upload), state, metrics

    poisoned = dataclasses.replace(glob, client_update=nan_in_round_0)
    alg = dataclasses.replace(alg, phases=(poisoned, alg.phases[1]), cache_key=None)
    config = dataclasses.replace(CONFIG, rounds=2)
    state = E.init_state(alg, base, N, seed=0)
    state, m1 = E.run_round(alg, state, base, round_batches(0, 1), SIZES, config)
    assert m1["global/aggregated"] is False and sorted(m1["global/excluded"]) == m1["clients"]
    assert np.isnan(m1["personal/loss"])  # not the last round: skipped
    state, m2 = E.run_round(alg, state, base, round_batches(1, 1), SIZES, config)
    assert m2["global/aggregated"] is True
    assert np.isfinite(m2["personal/loss"])
    assert np.asarray(state.client_states.has_bm)[m2["clients"]].all()
