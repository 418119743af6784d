"""FedGaLore on the real tiny model stories260K, through the engine, against hand-run clients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_checkpoint import _assert_same

from fedlora_jax import algorithms
from fedlora_jax.adapters import AdapterConfig
from fedlora_jax.algorithms import ClientTraining
from fedlora_jax.algorithms.fedgalore import (
    ServerState,
    make_galore_optimizer,
    rebuild_delta,
    upload_factors,
)
from fedlora_jax.algorithms.training import make_loss_fn
from fedlora_jax.federated.engine import EngineConfig, RoundInfo, init_state, models, run_round
from fedlora_jax.model.convert import load_hf_folder
from fedlora_jax.model.llama import apply
from fedlora_jax.model.loss import lm_loss
from fedlora_jax.optim import ajive, galore

K, STEPS, BATCH, SEQ, RANK, LR = 3, 2, 2, 12, 4, 1e-2
SAMPLES = 200  # AJIVE's bound samples (py_jive's default 1000 costs more than this test needs)
SIZES = np.array([10.0, 30.0, 20.0], np.float32)
# Two right-side (m >= n) targets and one left-side one (up_proj 64 x 172).
TARGETS = r"layers\.0\.(attn\.(q_proj|k_proj)|mlp\.up_proj)"
DIMS = [(64, 64), (64, 32), (64, 172)]
ENGINE = EngineConfig(donate=False)


@pytest.fixture(scope="module")
def model(stories_dir):
    return load_hf_folder(stories_dir)


@pytest.fixture(scope="module")
def training(model) -> ClientTraining:
    return ClientTraining(
        model=model[0],
        adapter=AdapterConfig(kind="dense_delta", r=RANK),
        local_steps=STEPS,
        lr=LR,
        grad_clip=1.0,
    )


@pytest.fixture(scope="module")
def batches() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 512, size=(K, STEPS, BATCH, SEQ)).astype(np.int32)
    loss_mask = np.ones_like(tokens)
    loss_mask[..., : SEQ // 2] = 0
    return {"tokens": tokens, "loss_mask": loss_mask, "attn_mask": np.ones_like(tokens)}


def _build(training, **options):
    return algorithms.get("fedgalore")(
        training, rank=RANK, targets=TARGETS, ajive_samples=SAMPLES, **options
    )


def _round(alg, base, batches):
    state = init_state(alg, base, K, seed=0)
    return state, *run_round(alg, state, base, batches, SIZES, ENGINE)


@pytest.fixture(scope="module")
def by_hand(model, training, batches):
    """Each client run with a plain Python loop: own loss, clip + GaLore-AdamW, cold Adam."""
    cfg, base = model
    alg = _build(training, sync="none")
    zeros = alg.init(jax.random.key(0), base, K)[0].adapters
    tx = optax.chain(
        optax.clip_by_global_norm(1.0), galore.galore_adamw(LR, rank=RANK, update_proj_gap=200)
    )

    def loss(p, batch):
        logits = apply(
            base, p, batch["tokens"], batch["attn_mask"], cfg=cfg, adapter_cfg=training.adapter
        )
        nll, n = lm_loss(logits, batch["tokens"], batch["loss_mask"])
        return nll / jnp.maximum(n, 1)

    grad, step = jax.jit(jax.grad(loss)), jax.jit(tx.update)
    out = []
    for c in range(K):
        params, state = zeros, tx.init(zeros)
        for s in range(STEPS):
            batch = {k: jnp.asarray(v[c, s]) for k, v in batches.items()}
            upd, state = step(grad(params, batch), state, params)
            params = optax.apply_updates(params, upd)
        out.append((params, galore.second_moment(state), galore.projectors(state)))
    return out


def _flat(tree):
    return {
        jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def _fedavg(trees):
    w = SIZES / SIZES.sum()
    return jax.tree.map(
        lambda *xs: sum(wi * np.asarray(x) for wi, x in zip(w, xs, strict=True)), *trees
    )


def test_sync_none_is_local_galore_then_fedavg(model, training, batches, by_hand):
    _, base = model
    alg = _build(training, sync="none")
    _, new, metrics = _round(alg, base, batches)
    want = _fedavg([p for p, _, _ in by_hand])
    got = _flat(new.server_state.adapters)
    for key, value in _flat(want).items():
        np.testing.assert_allclose(got[key], value, rtol=2e-4, atol=1e-7)
    assert max(np.abs(v).max() for v in got.values()) > 1e-3  # the round changed the model
    server = new.server_state  # no shared moment: its fields are empty
    assert (server.basis, server.nu, server.synced, server.joint_rank) == ({}, {}, {}, {})
    # Uplink: the factors of every target's rank-r ΔW, 4 bytes per entry: the projected change
    # (r x the larger side) and the projector (r x the smaller side). Downlink: the global ΔW.
    assert metrics["comm/up_bytes_per_client"] == sum(4 * RANK * (m + n) for m, n in DIMS)
    assert metrics["comm/down_bytes_per_client"] == sum(4 * m * n for m, n in DIMS)
    got_models = models(alg, new, K)
    assert got_models.personal is None and got_models.personal_is_global
    assert got_models.global_ is new.server_state.adapters


def _stacked(by_hand):
    """The hand-run clients' uploads: the factors of ΔW (from zero, ΔW = the trained params)."""
    stack = lambda i: jax.tree.map(lambda *x: jnp.stack(x), *[c[i] for c in by_hand])  # noqa: E731
    return {**upload_factors(stack(0), stack(2)), "nu": stack(1)}


def _check_shared(server, uploads, method, key=None):
    """The server state equals ajive.shared_second_moment on the hand-run clients' uploads
    (``key``: the aggregate's key; leaf i draws AJIVE's bounds from its fold i)."""
    w = jnp.asarray(SIZES)
    assert bool(server.synced)
    nus, projs = _flat(uploads["nu"]), _flat(uploads["proj"])
    basis, shared, kept = _flat(server.basis), _flat(server.nu), _flat(server.joint_rank)
    settings = ajive.AjiveSettings(RANK // 2, SAMPLES)
    top = RANK // 2 if method == "ajive" else RANK
    ranks = []
    for i, (name, value) in enumerate(shared.items()):
        side = "right" if projs[name].shape[-2] == value.shape[-1] else "left"
        leaf_key = None if key is None else jax.random.fold_in(key, i)
        b, s, k = ajive.shared_second_moment(
            nus[name], projs[name], w, side, method, 0.75, settings, leaf_key
        )
        assert int(kept[name]) == int(k) and 0 <= int(k) <= top
        ranks.append(int(k))
        # Compare basis-independent quantities (the SVD basis is unique only up to signs).
        np.testing.assert_allclose(np.abs(basis[name]), np.abs(np.asarray(b)), atol=2e-3)
        np.testing.assert_allclose(value, s, rtol=2e-3, atol=1e-12)
        assert value.min() >= 0.0 and (value.max() > 0.0) == (int(k) > 0)
    for name, value in _flat(_fedavg([p for p, _, _ in uploads["hand"]])).items():
        np.testing.assert_allclose(_flat(server.adapters)[name], value, rtol=2e-4, atol=1e-7)
    return ranks


@pytest.fixture(scope="module")
def mean_round(model, training, batches):
    """(algorithm, initial state, state after one engine round, metrics) with sync=mean."""
    alg = _build(training, sync="mean")
    return alg, *_round(alg, model[1], batches)


def test_sync_mean_round_through_the_engine(mean_round, by_hand):
    _, _, new, metrics = mean_round
    _check_shared(new.server_state, {**_stacked(by_hand), "hand": by_hand}, "mean")
    # Hand count per target m x n, 4 bytes per entry. Uplink: the factors (projected change,
    # r x the larger side, and projector, r x the smaller side) plus the projected moment
    # (r x the larger side): 4 r (m + n + max(m, n)). Downlink: the global ΔW (full size), the
    # server's basis and moment, and the 1-byte "synced" flag: 4 (mn + r (m + n)) + 1.
    up = sum(4 * RANK * (m + n + max(m, n)) for m, n in DIMS)
    down = sum(4 * (m * n + RANK * (m + n)) for m, n in DIMS) + 1
    assert (metrics["comm/up_bytes_per_client"], metrics["comm/down_bytes_per_client"]) == (
        up,
        down,
    )


def test_typed_states_and_a_round_through_a_checkpoint(mean_round, tmp_path):
    """init gives the typed server state (no client axis: the global ΔW per target, the shared
    moment in its rank-r basis, scalar flags) and empty client states; the state after one real
    round, saved and restored into a fresh init_state, is bitwise equal."""
    from fedlora_jax.checkpoint import Checkpointer

    _, fresh, after, _ = mean_round  # the engine does not donate (ENGINE.donate=False)
    server = fresh.server_state
    assert isinstance(server, ServerState) and fresh.client_states == {}
    assert sorted(x.shape for x in jax.tree.leaves(server.adapters)) == sorted(DIMS)  # [in, out]
    for tree in (server.basis, server.nu):
        assert all(x.ndim == 2 and RANK in x.shape for x in jax.tree.leaves(tree))
        assert jax.tree.structure(tree) == jax.tree.structure(server.adapters)
    assert (server.synced.shape, server.synced.dtype) == ((), bool) and not bool(server.synced)
    ranks = {(x.shape, x.dtype) for x in jax.tree.leaves(server.joint_rank)}
    assert ranks == {((), np.dtype(np.int32))}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, after, {"round": 1})
        ckpt.wait()
        restored, _ = ckpt.restore(fresh)
    assert isinstance(restored.server_state, ServerState) and bool(restored.server_state.synced)
    _assert_same(restored, after)


def test_factor_upload_rebuilds_the_rank_r_update(model, training, batches, by_hand):
    """Client 0's uploaded factors rebuild its full ΔW (the hand-run client's, from ΔW = 0)."""
    _, base = model
    alg = _build(training, sync="none")
    server, clients = alg.init(jax.random.key(0), base, K)
    info = RoundInfo(jnp.int32(0), jax.random.key(0), None, K)
    phase = alg.phases[0]
    row = {k: jnp.asarray(v[0]) for k, v in batches.items()}
    key = jax.random.fold_in(jax.random.key(0), 0)
    upload, _, _ = jax.jit(phase.client_update)(
        base, phase.broadcast(server, jnp.arange(K), info), jax.tree.map(lambda x: x[0], clients),
        row, key, info,
    )  # fmt: skip
    rebuilt = _flat(rebuild_delta(upload["low"], upload["proj"]))
    for name, full in _flat(by_hand[0][0]).items():
        assert np.linalg.matrix_rank(full, tol=1e-6 * np.abs(full).max()) == RANK
        np.testing.assert_allclose(rebuilt[name], full, rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("method", ["ajive", "subspace"])
def test_sync_ajive_and_subspace_aggregate(model, training, by_hand, method):
    _, base = model
    alg = _build(training, sync=method, threshold=0.75)
    server0, _ = alg.init(jax.random.key(0), base, K)
    uploads = _stacked(by_hand)
    info = RoundInfo(jnp.int32(0), jax.random.key(3), None, K)
    aggregate = jax.jit(alg.phases[0].aggregate)
    server = aggregate(server0, uploads, jnp.asarray(SIZES), jnp.arange(K), info)
    _check_shared(server, {**uploads, "hand": by_hand}, method, info.key)


def test_second_round_starts_from_the_shared_moment(model, training, batches):
    """A huge shared second moment must shrink the first steps; round 0 (unsynced) ignores it."""
    _, base = model
    default = algorithms.get("fedgalore")(training, rank=RANK)
    shapes = jax.eval_shape(lambda: default.init(jax.random.key(0), base, K))[0].adapters
    assert len(_flat(shapes)) == 5 * 4  # default targets: attn q, k, v, o in every layer
    alg = _build(training, sync="ajive")
    server, clients = alg.init(jax.random.key(0), base, K)
    phase = alg.phases[0]
    row = {k: jnp.asarray(v[0]) for k, v in batches.items()}
    state = jax.tree.map(lambda x: x[0], clients)
    info = RoundInfo(jnp.int32(0), jax.random.key(0), None, K)
    update = jax.jit(phase.client_update)
    tx = make_galore_optimizer(training, RANK, 200, 0.25)
    loss_fn = make_loss_fn(training)

    def first_loss(b, p, batch):
        return loss_fn(b, p, jax.tree.map(lambda x: x[0], batch), None)[0]

    # The server's basis = the client's own first projector, so the seed is nu_value exactly.
    payload0 = phase.broadcast(server, jnp.arange(K), info)
    grads = jax.jit(jax.grad(first_loss, argnums=1))(base, payload0["adapters"], row)
    own = galore.projectors(galore.refresh_projectors(tx.init(payload0["adapters"]), grads))

    def delta_norm(nu_value, synced):
        payload = {
            **payload0,
            "basis": own,
            "nu": jax.tree.map(lambda v: jnp.full_like(v, nu_value), payload0["nu"]),
            "synced": jnp.asarray(synced),
        }
        upload, _, metrics = update(base, payload, state, row, jax.random.key(1), info)
        assert np.isfinite(float(metrics["loss"]))
        return float(optax.tree.norm(rebuild_delta(upload["low"], upload["proj"])))

    cold, big_unsynced, big = delta_norm(0.0, False), delta_norm(1e4, False), delta_norm(1e4, True)
    assert big_unsynced == pytest.approx(cold, rel=1e-5)
    assert big < 0.05 * cold


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"sync": "median"}, "sync"),
        ({"threshold": 0.0}, "threshold"),
        ({"rank": 0}, "rank"),
        ({"rank": 32}, "rank"),  # k_proj is 64 x 32: the rank must stay below 32
        ({"update_proj_gap": 1}, "update_proj_gap"),  # local_steps = 2: P would change mid-round
        ({"signal_rank": 3}, "signal_rank"),  # above rank // 2 = 2
        ({"sync": "ajive", "rank": 1}, "signal_rank"),  # rank 1 leaves no AJIVE signal rank
    ],
)
def test_bad_options_name_the_key(training, change, match):
    with pytest.raises(ValueError, match=f"algorithm.options.{match}"):
        algorithms.get("fedgalore")(training, **change)


def test_wrong_kind_and_persistent_state_are_rejected(training):
    lora = ClientTraining(model=training.model, adapter=AdapterConfig(kind="lora"))
    with pytest.raises(ValueError, match="adapter.kind"):
        algorithms.get("fedgalore")(lora)
    persistent = ClientTraining(
        model=training.model, adapter=training.adapter, optimizer_state="persistent"
    )
    with pytest.raises(ValueError, match="optimizer_state"):
        algorithms.get("fedgalore")(persistent)
    decay = ClientTraining(model=training.model, adapter=training.adapter, weight_decay=0.1)
    with pytest.raises(ValueError, match="training.weight_decay"):
        algorithms.get("fedgalore")(decay)


def test_footprint_matches_the_uploaded_shapes(training):
    from fedlora_jax.algorithms.fedgalore import footprint

    fp = footprint(training, rank=RANK, targets=TARGETS)
    assert fp["delta"] == fp["downlink_none"] == sum(4 * m * n for m, n in DIMS)
    assert fp["uplink_none"] == sum(4 * RANK * (m + n) for m, n in DIMS)
    assert fp["uplink"] == sum(4 * RANK * (m + n + max(m, n)) for m, n in DIMS)
    assert fp["downlink"] == sum(4 * (m * n + RANK * (m + n)) for m, n in DIMS) + 1
    # clip state is empty; GaLore: mu, nu (4 bytes) and warm flags (1 byte) per projected entry,
    # the projectors, and three int32 scalars (two counters + the lr schedule's count).
    moments = sum(RANK * max(m, n) for m, n in DIMS)
    projs = sum(RANK * min(m, n) for m, n in DIMS)
    assert fp["optimizer"] == 9 * moments + 4 * projs + 3 * 4
