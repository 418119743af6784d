"""The mesh backend (clients x fsdp, base split by the partition rules) equals the vmap backend.

Runs in a worker interpreter with 8 fake CPU devices (tests/fake_devices.py): stories260K cut to
its first 2 layers (compile time), N=4
clients with K=4 sampled per round, two rounds, mesh clients=2,fsdp=4 (each client's batch of 4
split over fsdp), for FedIT, FedALT (per-client broadcast) and FedLoRA-Optimizer (two phases).
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import numpy as np
import pytest
from fake_devices import run_worker

from fedlora_jax.adapters import AdapterConfig
from fedlora_jax.algorithms import ClientTraining, get
from fedlora_jax.federated import engine as E
from fedlora_jax.model.convert import load_hf_folder

N, STEPS, BATCH, SEQ, ROUNDS, LAYERS = 4, 2, 4, 32, 2, 2
MESH = "clients=2,fsdp=4"
CASES = {
    "fedit": (AdapterConfig(r=4), {}),
    "fedalt": (AdapterConfig(kind="mixture", r=2, alpha=8.0), {}),
    "fedlora_optimizer": (AdapterConfig(kind="decomposed", r=2, alpha=4.0), {}),
}


def _batches(alg, seed: int = 0) -> dict:
    """{phase: batches [N, steps, batch, seq]}: random tokens, loss on the second half."""
    rng = np.random.default_rng(seed)
    out = {}
    for phase in alg.phases:
        tokens = rng.integers(3, 512, (N, phase.steps, BATCH, SEQ)).astype(np.int32)
        loss_mask = np.ones_like(tokens)
        loss_mask[..., : SEQ // 2] = 0
        out[phase.name] = {
            "tokens": tokens,
            "loss_mask": loss_mask,
            "attn_mask": np.ones_like(tokens),
        }
    return out


def _run(alg, base, config: E.EngineConfig) -> tuple[dict, list]:
    state = E.init_state(alg, base, N, seed=0)
    sizes = np.array([10.0, 20.0, 30.0, 40.0], np.float32)
    losses = []
    for r in range(ROUNDS):
        state, metrics = E.run_round(alg, state, base, _batches(alg, r), sizes, config)
        losses += [v for k, v in sorted(metrics.items()) if k.endswith("/per_client/loss")]
    host = jax.tree.map(np.asarray, (state.server_state, state.client_states))
    return host, losses


def _worker_mesh_equals_vmap(stories_dir: str, name: str) -> dict:
    assert jax.device_count() == 8
    cfg, base = load_hf_folder(pathlib.Path(stories_dir))
    base = {**base, "layers": jax.tree.map(lambda x: x[:LAYERS], base["layers"])}
    cfg = dataclasses.replace(cfg, num_layers=LAYERS)
    adapter, options = CASES[name]
    training = ClientTraining(model=cfg, adapter=adapter, local_steps=STEPS, lr=1e-2)
    alg = get(name)(training, **options)
    ref, ref_losses = _run(alg, base, E.EngineConfig(seed=1))
    got, got_losses = _run(alg, base, E.EngineConfig(seed=1, backend="mesh", mesh=MESH))
    ref, got = (jax.tree.map(lambda x: np.asarray(x, np.float64), t) for t in (ref, got))
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b), initial=0.0)), ref, got)
    # The backends differ only in summation order (the batch is split over fsdp). Adam divides
    # each coordinate's step by its own gradient scale, so a coordinate whose gradient is near 0
    # can move by a visible fraction of one step (lr = 1e-2): tolerance 5% of a step.
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=5e-4)
    np.testing.assert_allclose(got_losses, ref_losses, rtol=1e-4)
    moved = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(ref[0]))
    return {"max_diff": max(jax.tree.leaves(diffs)), "server_scale": moved}


@pytest.mark.parametrize("name", sorted(CASES))
def test_mesh_backend_equals_vmap(stories_dir, name):
    res = run_worker(
        "test_sharding_mesh", "_worker_mesh_equals_vmap", str(stories_dir), name, timeout=1200
    )
    assert res["server_scale"] > 0  # the rounds trained something
    assert res["max_diff"] < 5e-4


def test_mesh_config_errors_name_the_keys():
    with pytest.raises(ValueError, match="the mesh backend needs a mesh"):
        E.EngineConfig(backend="mesh")
    with pytest.raises(ValueError, match="only it takes one"):
        E.EngineConfig(backend="vmap", mesh=MESH)
    with pytest.raises(ValueError, match="federated.mesh='clients=2,data=4': bad entry 'data=4'"):
        E.EngineConfig(backend="mesh", mesh="clients=2,data=4")


def test_sampled_clients_that_do_not_divide_over_the_clients_axis_are_one_line():
    from fedlora_jax.federated.distributed import MeshError, check_sampled

    check_sampled(6, 3)
    with pytest.raises(MeshError) as e:
        check_sampled(3, 2)
    msg = str(e.value)
    assert "3 sampled clients per round do not divide over federated.mesh's clients=2" in msg
    assert "\n" not in msg


# ----------------------------------------------------------------------------- Poisson draws

POISSON_N, POISSON_RATE, POISSON_MESH = 6, 0.5, "clients=4,fsdp=2"


def _poisson_seed(rounds: int, axis: int) -> int:
    """The first sampling seed whose every round draws a non-empty K that does not divide over
    ``axis`` (so the mesh round pads), with two different K (two padded shapes)."""
    from fedlora_jax.federated.sampling import poisson_sample

    for seed in range(100):
        ks = [len(poisson_sample(seed, r, POISSON_N, POISSON_RATE)) for r in range(rounds)]
        if all(k % axis for k in ks) and len(set(ks)) == rounds:
            return seed
    raise AssertionError("no seed draws non-dividing K")


def _worker_poisson_mesh_equals_vmap(stories_dir: str, private: bool) -> dict:
    """FedIT (or DP-FedAvg around it: noise, clipping, adaptive clip) with Poisson sampling:
    the mesh round, padded to a multiple of clients=4, equals the vmap round on the same draw."""
    from fedlora_jax.privacy import privatise
    from fedlora_jax.privacy.private import PrivacySettings, settings

    assert jax.device_count() == 8
    n = POISSON_N
    cfg, base = load_hf_folder(pathlib.Path(stories_dir))
    base = {**base, "layers": jax.tree.map(lambda x: x[:LAYERS], base["layers"])}
    cfg = dataclasses.replace(cfg, num_layers=LAYERS)
    training = ClientTraining(model=cfg, adapter=AdapterConfig(r=4), local_steps=STEPS, lr=1e-2)
    alg = get("fedit")(training)
    if private:  # C small enough to clip, σ = 1, adaptive clipping's noisy count
        dp = PrivacySettings(
            enabled=True, clip=0.05, noise_multiplier=1.0, adaptive_clip=True,
            clipped_count_stddev=2.0,
        )  # fmt: skip
        alg = privatise(alg, settings(dp, n, ROUNDS, client_fraction=POISSON_RATE))
    seed = _poisson_seed(ROUNDS, 4)
    sizes = np.arange(1.0, n + 1, dtype=np.float32) * 10
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 512, (ROUNDS, n, STEPS, BATCH, SEQ)).astype(np.int32)

    def run(config: E.EngineConfig) -> tuple:
        state = E.init_state(alg, base, n, seed=0)
        drawn = []
        for r in range(ROUNDS):
            batches = {"tokens": tokens[r], "attn_mask": np.ones_like(tokens[r])}
            batches["loss_mask"] = (np.arange(SEQ) >= SEQ // 2) * batches["attn_mask"]
            state, metrics = E.run_round(alg, state, base, batches, sizes, config)
            drawn.append(metrics["clients"])
            assert metrics["train/excluded"] == []  # padding is not reported as excluded
            assert len(metrics["train/per_client/loss"]) == len(metrics["clients"])
        return jax.tree.map(np.asarray, (state.server_state, state.client_states)), drawn

    common = {"seed": seed, "sampling_rate": POISSON_RATE, "rounds": ROUNDS}
    ref, ref_drawn = run(E.EngineConfig(**common))
    got, got_drawn = run(E.EngineConfig(backend="mesh", mesh=POISSON_MESH, **common))
    assert got_drawn == ref_drawn
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(b, np.float64), a, rtol=0, atol=5e-4)
    server = ref[0].inner if private else ref[0]
    return {
        "drawn": [len(d) for d in ref_drawn],
        "server_scale": max(float(np.max(np.abs(x))) for x in jax.tree.leaves(server.params)),
        "clip_fraction": float(ref[0].clip.fraction) if private else 1.0,
    }


@pytest.mark.parametrize("private", [False, True], ids=["fedit", "dp_fedavg"])
def test_poisson_draw_padded_over_the_clients_axis_equals_vmap(stories_dir, private):
    """A Poisson draw of K not divisible by clients=4 is padded with clients that are computed
    but excluded (weight 0, no state write); FedIT and DP-FedAvg (noise, adaptive clipping:
    a padding client must not change the clipped count or the fixed denominator) equal vmap."""
    res = run_worker(
        "test_sharding_mesh", "_worker_poisson_mesh_equals_vmap", str(stories_dir), private,
        timeout=1200,
    )  # fmt: skip
    assert all(k % 4 for k in res["drawn"]) and res["server_scale"] > 0
    assert res["clip_fraction"] > 0  # DP: the last round clipped some update
