"""Engine: backends agree with a plain loop, NaN clients are excluded, no retrace, comm bytes.

Model-dependent tests run on stories260K cut to its first 2 layers (real weights, compiles ~2x
faster than all 5 layers) with N=4 clients, K=3 sampled, 2 local steps, batch 2, seq 16.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax.adapters import AdapterConfig
from fedlora_jax.algorithms import ClientTraining, Phase, get
from fedlora_jax.federated import engine as E
from fedlora_jax.federated.sampling import num_sampled, sample_clients
from fedlora_jax.model.convert import load_hf_folder

REPO = pathlib.Path(__file__).resolve().parents[1]
N, K, STEPS, BATCH, SEQ, LAYERS = 4, 3, 2, 2, 16, 2
SIZES = np.array([10.0, 20.0, 30.0, 40.0], np.float32)
TRACES = {"count": 0}


def tiny_stories(stories_dir: pathlib.Path, layers: int = LAYERS):
    """stories260K truncated to its first ``layers`` layers."""
    cfg, base = load_hf_folder(stories_dir)
    base = {**base, "layers": jax.tree.map(lambda x: x[:layers], base["layers"])}
    return dataclasses.replace(cfg, num_layers=layers), base


def make_batches(seed: int = 0, poison: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    """Random token batches [N, steps, batch, seq]; ``poison`` marks clients to emit NaN."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 512, (N, STEPS, BATCH, SEQ)).astype(np.int32)
    loss_mask = np.ones_like(tokens)
    loss_mask[..., : SEQ // 2] = 0
    flag = np.zeros((N, STEPS), np.float32)
    flag[list(poison)] = 1.0
    return {
        "tokens": tokens,
        "loss_mask": loss_mask,
        "attn_mask": np.ones_like(tokens),
        "poison": flag,
    }


def with_poison(phase: Phase) -> Phase:
    """The same phase whose upload turns NaN when the client's batches carry a poison flag."""

    def client_update(base, payload, client_state, batches, key, info):
        TRACES["count"] += 1
        upload, state, metrics = phase.client_update(
            base, payload, client_state, batches, key, info
        )
        bad = jnp.where(jnp.any(batches["poison"] > 0), jnp.nan, 0.0)
        return jax.tree.map(lambda u: u + bad, upload), state, metrics

    return dataclasses.replace(phase, client_update=client_update)


def build(stories_dir: pathlib.Path):
    """FedIT with a poisonable phase, on the truncated model (also used by the subprocess).

    Its optimizer state persists per client, so Adam's step count tells who trained."""
    cfg, base = tiny_stories(stories_dir)
    training = ClientTraining(
        model=cfg,
        adapter=AdapterConfig(r=2),
        local_steps=STEPS,
        lr=1e-2,
        optimizer_state="persistent",
    )
    alg = get("fedit")(training)
    alg = dataclasses.replace(alg, phases=(with_poison(alg.phases[0]),), cache_key=None)
    return alg, base


def participations(client_states) -> np.ndarray:
    """[N] rounds each client trained in, from its persistent Adam step count."""
    flat = jax.tree_util.tree_leaves_with_path(client_states.opt_state)
    counts = [x for path, x in flat if jax.tree_util.keystr(path).endswith(".count")]
    return np.asarray(counts[0]) // STEPS


def info_for(round_idx: int = 0):
    return E.RoundInfo(jnp.int32(round_idx), jax.random.key(0), None, N)


@pytest.fixture(scope="module")
def setup(stories_dir):
    return build(stories_dir)


def fresh(alg, base):
    return E.init_state(alg, base, N, seed=0)


CONFIG = E.EngineConfig(clients_per_round=K, seed=3)


@pytest.fixture(scope="module")
def vmap_round(setup):
    alg, base = setup
    return E.run_round(alg, fresh(alg, base), base, make_batches(), SIZES, CONFIG)


@pytest.fixture(scope="module")
def loop_reference(setup):
    """Each sampled client's update via a jitted single-client call in a Python loop."""
    alg, base = setup
    phase = alg.phases[0]
    state = fresh(alg, base)
    ids = sample_clients(CONFIG.seed, 0, N, K)
    batches = make_batches()
    key = jax.random.fold_in(jax.random.fold_in(state.rng, 0), 0)
    update = jax.jit(phase.client_update)
    payload = phase.broadcast(state.server_state, jnp.asarray(ids), info_for())
    uploads = []
    for i in ids:
        row = jax.tree.map(lambda x, i=i: x[i], state.client_states)
        b = {k: v[i] for k, v in batches.items()}
        upload, _, _ = update(base, payload, row, b, jax.random.fold_in(key, int(i)), info_for())
        uploads.append(upload)
    return ids, uploads


def np_weighted_mean(uploads, weights):
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    return jax.tree.map(
        lambda *xs: sum(wi * np.asarray(x, np.float64) for wi, x in zip(w, xs, strict=True)),
        *uploads,
    )


def assert_trees_close(a, b, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=atol), a, b)


def test_vmap_matches_python_loop(vmap_round, loop_reference):
    state, metrics = vmap_round
    ids, uploads = loop_reference
    assert metrics["clients"] == ids.tolist()
    expected = np_weighted_mean(uploads, SIZES[ids])
    assert_trees_close(state.server_state.params, expected)
    rounds = participations(state.client_states)
    assert rounds[ids].tolist() == [1] * K
    assert rounds.sum() == K  # the unsampled client's state is untouched
    assert metrics["train/excluded"] == []
    assert metrics["train/aggregated"] is True
    assert np.isfinite(metrics["train/loss"])
    assert state.round == 1


def test_chunked_matches_vmap(setup, vmap_round):
    alg, base = setup
    config = dataclasses.replace(CONFIG, backend="chunked", chunk_size=2)  # 3 = 2 + remainder
    state, _ = E.run_round(alg, fresh(alg, base), base, make_batches(), SIZES, config)
    assert_trees_close(state.server_state.params, vmap_round[0].server_state.params)


def test_debug_backend_matches_vmap(setup, vmap_round):
    """No jit, one client at a time: the same round as vmap (float tolerance)."""
    alg, base = setup
    config = dataclasses.replace(CONFIG, backend="debug")
    state, metrics = E.run_round(alg, fresh(alg, base), base, make_batches(), SIZES, config)
    assert_trees_close(state.server_state, vmap_round[0].server_state)
    assert_trees_close(state.client_states, vmap_round[0].client_states)
    assert metrics["clients"] == vmap_round[1]["clients"]
    assert metrics["comm/up_bytes"] == vmap_round[1]["comm/up_bytes"]


def test_debug_backend_names_client_and_round(setup):
    alg, base = setup
    phase = alg.phases[0]

    def broken(base, payload, state, batches, key, info):
        raise FloatingPointError("boom")

    bad = dataclasses.replace(alg, phases=(dataclasses.replace(phase, client_update=broken),))
    config = dataclasses.replace(CONFIG, backend="debug")
    ids = sample_clients(CONFIG.seed, 0, N, K)
    with pytest.raises(RuntimeError, match=rf"round 0, client {ids[0]}: FloatingPointError: boom"):
        E.run_round(bad, fresh(bad, base), base, make_batches(), SIZES, config)


def test_shard_map_matches_vmap(vmap_round, stories_dir, tmp_path):
    """8 fake CPU devices in a subprocess; K=3 is padded to 8 rows on the clients mesh."""
    out = tmp_path / "shard.npz"
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "PYTHONPATH": str(REPO),
    }
    code = (
        f"import sys, numpy as np, jax; sys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "import test_engine as t\n"
        "assert jax.device_count() == 8\n"
        f"alg, base = t.build(t.pathlib.Path({str(stories_dir)!r}))\n"
        "cfg = t.dataclasses.replace(t.CONFIG, backend='shard_map')\n"
        "s, m = t.E.run_round(alg, t.fresh(alg, base), base, t.make_batches(), t.SIZES, cfg)\n"
        f"np.savez({str(out)!r}, *jax.tree.leaves(s.server_state),"
        " clients=np.array(m['clients']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out)
    leaves = jax.tree.leaves(vmap_round[0].server_state)
    assert got["clients"].tolist() == vmap_round[1]["clients"]
    for i, leaf in enumerate(leaves):
        np.testing.assert_allclose(got[f"arr_{i}"], leaf, rtol=1e-5, atol=1e-6)


def test_nan_client_excluded_and_flagged(setup, loop_reference, caplog):
    alg, base = setup
    ids, uploads = loop_reference
    bad = int(ids[1])
    with caplog.at_level(logging.WARNING, logger="fedlora_jax.federated.engine"):
        state, metrics = E.run_round(
            alg, fresh(alg, base), base, make_batches(poison=(bad,)), SIZES, CONFIG
        )
    assert metrics["train/excluded"] == [bad]
    assert metrics["train/aggregated"] is True
    assert any("non-finite" in r.message and str(bad) in r.message for r in caplog.records)
    keep = [j for j, i in enumerate(ids) if i != bad]
    expected = np_weighted_mean([uploads[j] for j in keep], SIZES[ids[keep]])
    assert_trees_close(state.server_state.params, expected)
    assert participations(state.client_states)[bad] == 0  # its client state was not updated


def test_all_clients_nan_keeps_server_state(setup, caplog):
    alg, base = setup
    state0 = fresh(alg, base)
    before = jax.tree.map(np.array, state0.server_state)
    with caplog.at_level(logging.WARNING, logger="fedlora_jax.federated.engine"):
        state, metrics = E.run_round(
            alg, state0, base, make_batches(poison=tuple(range(N))), SIZES, CONFIG
        )
    assert metrics["train/aggregated"] is False
    assert sorted(metrics["train/excluded"]) == metrics["clients"]
    assert any("server state kept" in r.message for r in caplog.records)
    assert_trees_close(state.server_state, before, atol=0)


def test_no_retrace_across_rounds(setup, vmap_round):
    alg, base = setup
    state = fresh(alg, base)
    state, _ = E.run_round(alg, state, base, make_batches(0), SIZES, CONFIG)
    traced = TRACES["count"]
    seen = set()
    for r in range(1, 8):
        state, m = E.run_round(alg, state, base, make_batches(r), SIZES, CONFIG)
        seen.add(tuple(m["clients"]))
    assert TRACES["count"] == traced
    assert len(seen) > 1  # different clients each round, same compiled function
    assert int(participations(state.client_states).sum()) == 8 * K


def test_comm_bytes_match_hand_count(vmap_round):
    # r=2 on q_proj (64→64) and v_proj (64→32) in 2 layers: A [2,64] + B [out,2] float32.
    per_layer = 2 * 64 + 64 * 2 + 2 * 64 + 32 * 2
    expected = per_layer * LAYERS * 4
    _, metrics = vmap_round
    assert metrics["comm/down_bytes_per_client"] == expected
    assert metrics["comm/up_bytes_per_client"] == expected
    assert metrics["comm/up_bytes"] == expected * K


def test_sampling_is_deterministic():
    a = sample_clients(7, 5, 10, count=4)
    assert a.tolist() == sample_clients(7, 5, 10, count=4).tolist()
    assert a.tolist() == sorted(set(a.tolist())) and len(a) == 4
    draws = {tuple(sample_clients(7, r, 10, count=4)) for r in range(20)}
    assert len(draws) > 5  # varies with the round
    assert sample_clients(1, 0, 10, fraction=0.25).shape == (3,)  # 2.5 rounds half up
    assert num_sampled(10, fraction=0.01) == 1
    assert sample_clients(0, 0, 5).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"count": 0}, "clients_per_round=0"),
        ({"count": 11}, "clients_per_round=11"),
        ({"fraction": 0.0}, "client_fraction"),
        ({"count": 2, "fraction": 0.5}, "not both"),
    ],
)
def test_sampling_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_clients(0, 0, 10, **kwargs)


def test_bad_inputs_give_clear_errors(setup):
    alg, base = setup
    with pytest.raises(ValueError, match="federated.backend='pmap'"):
        E.EngineConfig(backend="pmap")
    state = fresh(alg, base)
    short = {k: v[:, :1] for k, v in make_batches().items()}
    with pytest.raises(ValueError, match=r"expected \[4 clients, 2 steps"):
        E.run_round(alg, state, base, short, SIZES, CONFIG)
    with pytest.raises(ValueError, match="client_sizes has 3 entries"):
        E.run_round(alg, state, base, make_batches(), SIZES[:3], CONFIG)
    missing = {k: v for k, v in make_batches().items() if k != "loss_mask"}
    with pytest.raises(ValueError, match="lack keys"):
        E.run_round(alg, state, base, missing, SIZES, CONFIG)


def test_batches_function_receives_sampled_ids(setup, vmap_round):
    alg, base = setup
    full = make_batches()
    calls = []

    def batches_fn(round_idx, phase, ids):
        calls.append((round_idx, phase.name, ids.tolist()))
        return {k: v[ids] for k, v in full.items()}

    state, _ = E.run_round(alg, fresh(alg, base), base, batches_fn, SIZES, CONFIG)
    assert calls == [(0, "train", vmap_round[1]["clients"])]
    assert_trees_close(state.server_state, vmap_round[0].server_state, atol=0)
    json.dumps(vmap_round[1])  # round metrics are plain JSON


def toy_algorithm(per_client: bool = False):
    """A model-free algorithm: its state holds the very base array and one array twice; with
    ``per_client`` the broadcast is ``w + client id`` per client (leading axis K)."""
    from fedlora_jax.algorithms import Algorithm, Models

    def init(key, base, n):
        shared = jnp.ones((n,))
        return {"w": base["w"]}, {"x": shared, "y": shared}

    def broadcast(server, ids, info):
        if per_client:
            return {"w": server["w"][None] + ids[:, None].astype(jnp.float32)}
        return server

    def client_update(base, payload, state, batches, key, info):
        upload = {"w": payload["w"] + jnp.sum(batches["tokens"])}
        return upload, {"x": state["x"] + 1, "y": state["y"]}, {"loss": jnp.float32(0)}

    def aggregate(server, uploads, weights, ids, info):
        return {"w": jnp.tensordot(weights / weights.sum(), uploads["w"], axes=1)}

    phase = Phase("train", 1, broadcast, client_update, aggregate, per_client_broadcast=per_client)
    return Algorithm("toy", init, (phase,), lambda s, c, info: Models(s, None))


TOY_ONES = np.ones((3, 1, 1, 1), np.int32)
TOY_BATCHES = {"tokens": TOY_ONES, "loss_mask": TOY_ONES, "attn_mask": TOY_ONES}


def test_state_aliasing_base_is_copied_before_donation():
    base = {"w": jnp.arange(3.0)}
    alg = toy_algorithm()
    state = E.init_state(alg, base, 3)
    assert state.server_state["w"] is not base["w"]
    state, _ = E.run_round(alg, state, base, TOY_BATCHES, [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(base["w"], [0.0, 1.0, 2.0])  # base still alive and intact
    np.testing.assert_array_equal(state.server_state["w"], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(state.client_states["x"], [2.0, 2.0, 2.0])


@pytest.mark.parametrize("backend", ["vmap", "chunked"])
def test_per_client_broadcast(backend):
    base = {"w": jnp.zeros(5)}
    alg = toy_algorithm(per_client=True)
    config = E.EngineConfig(backend=backend, chunk_size=2)
    state, metrics = E.run_round(
        alg, E.init_state(alg, base, 3), base, TOY_BATCHES, [1.0, 1.0, 2.0], config
    )
    # client c uploads c + 1 everywhere; weights 1, 1, 2 → (1 + 2 + 2·3) / 4
    np.testing.assert_allclose(state.server_state["w"], np.full(5, 9 / 4))
    assert metrics["comm/down_bytes_per_client"] == 5 * 4  # its own slice, not all K rows
    assert metrics["comm/up_bytes_per_client"] == 5 * 4


def test_heap_released_after_rounds_that_compile(setup, monkeypatch):
    alg, base = setup
    calls = []
    monkeypatch.setattr(E, "release_free_heap", lambda: calls.append(1) or True)
    config = E.EngineConfig(clients_per_round=K, seed=101)  # a config no other test compiled
    state, _ = E.run_round(alg, fresh(alg, base), base, make_batches(0), SIZES, config)
    assert len(calls) == 1  # the first round compiled the phase
    E.run_round(alg, state, base, make_batches(1), SIZES, config)
    assert len(calls) == 1  # same shapes: nothing compiled, nothing to release
