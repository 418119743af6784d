"""Two processes x 4 CPU devices (gloo collectives, coordinator on 127.0.0.1) run the mesh
backend end to end: the base loaded shard by shard from the packaged stories260K safetensors,
each process preparing only its clients' batches, an orbax checkpoint of the engine state as it
is (host-local key and round included) written by both processes through ``Checkpointer`` and
restored after a stop, the result compared with one process on one device. Disagreeing configs
are tested through scripts/train.py (tests/test_distributed_train.py).
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np
import pytest
from fake_devices import free_port, result_of, run_processes, worker_command, worker_env

N, K, STEPS, BATCH, SEQ, ROUNDS, LAYERS = 4, 4, 2, 4, 32, 2, 2
TIMEOUT = 900  # seconds per process; the whole run is a few compiles of a 2-layer model
MESH = "clients=2,fsdp=4"


def _setup(stories_dir: str):
    from fedlora_jax.adapters import AdapterConfig
    from fedlora_jax.algorithms import ClientTraining, get
    from fedlora_jax.model.convert import read_hf_config

    cfg = read_hf_config(stories_dir)
    training = ClientTraining(model=cfg, adapter=AdapterConfig(r=4), local_steps=STEPS, lr=1e-2)
    return get("fedit")(training)


def _batches(round_idx: int, phase, ids: np.ndarray, asked: list) -> dict:
    """Client c's batches in round r depend on (r, c) only, so any subset can be made alone."""
    asked.append(sorted(int(i) for i in ids))
    rows = []
    for c in ids:
        rng = np.random.default_rng([round_idx, int(c)])
        rows.append(rng.integers(3, 512, (phase.steps, BATCH, SEQ)).astype(np.int32))
    tokens = np.stack(rows)
    loss_mask = np.ones_like(tokens)
    loss_mask[..., : SEQ // 2] = 0
    return {"tokens": tokens, "loss_mask": loss_mask, "attn_mask": np.ones_like(tokens)}


SIZES = np.array([10.0, 20.0, 30.0, 40.0], np.float32)


def _flat(tree, to_host) -> dict:
    """{leaf path: nested lists} of a state pytree (typed states included), for JSON."""
    import jax

    return {
        jax.tree_util.keystr(path): np.asarray(to_host(x), np.float64).tolist()
        for path, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def _worker_single(stories_dir: str) -> dict:
    """The reference: one process, one device, vmap backend."""

    from fedlora_jax.federated import engine as E
    from fedlora_jax.model.convert import load_hf_folder

    alg = _setup(stories_dir)
    _, base = load_hf_folder(stories_dir)
    state = E.init_state(alg, base, N, seed=0)
    config = E.EngineConfig(seed=1)
    for _ in range(ROUNDS):
        state, _ = E.run_round(
            alg, state, base, lambda r, p, i: _batches(r, p, i, []), SIZES, config
        )
    return {"server": _flat(state.server_state, np.asarray)}


def _worker_process(stories_dir: str, port: int, pid: int, out: str, mode: str) -> dict:
    """One of two processes. mode: full (all rounds), stop (checkpoint after round 1 and end),
    resume (restore the checkpoint into the initial state, finish)."""
    import jax
    from jax.experimental import multihost_utils

    from fedlora_jax.checkpoint import Checkpointer, CheckpointError
    from fedlora_jax.federated import distributed as dist
    from fedlora_jax.federated import engine as E
    from fedlora_jax.model.sharded_load import sharded_load

    assert dist.initialize(f"127.0.0.1:{port}", 2, pid)
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    dist.check_same_config({"mesh": MESH, "rounds": ROUNDS, "seed": 1})
    alg = _setup(stories_dir)
    config = E.EngineConfig(seed=1, backend="mesh", mesh=MESH)
    mesh = dist.mesh_of(MESH)
    _, base = sharded_load(stories_dir, mesh)  # this process reads its own blocks only
    state = E.init_state(alg, base, N, seed=0)
    ckpt = Checkpointer(pathlib.Path(out) / "ckpt", keep=2)
    start = 0
    if mode == "resume":  # the plain API: host-local initial state in, host-local values out
        state, meta = ckpt.restore(state)
        start = int(meta["round"])
        assert state.round == start and type(state.round) is int
    asked: list = []
    for _ in range(start, ROUNDS if mode != "stop" else 1):
        state, _ = E.run_round(
            alg, state, base, lambda r, p, i: _batches(r, p, i, asked), SIZES, config
        )
    differ = None
    if mode == "stop":  # the key and round are host-local; the states span both processes
        ckpt.save(state.round, state, {"round": state.round})
        try:  # a host-local value that is not the same on both processes: refused, on both
            ckpt.save(state.round + 1, {"x": np.int32(pid)}, {})
        except CheckpointError as e:
            differ = str(e)
    ckpt.close()
    server = _flat(state.server_state, lambda x: multihost_utils.process_allgather(x, tiled=True))
    result = {"asked": asked, "server": server, "primary": dist.is_primary(), "differ": differ}
    if dist.is_primary():  # artifacts from process 0 only
        (pathlib.Path(out) / f"result_{mode}.json").write_text(json.dumps(result))
    return result


def _two_processes(stories_dir: pathlib.Path, out: pathlib.Path, mode: str) -> list[dict]:
    port = free_port()
    commands = [
        worker_command(
            "test_multihost", "_worker_process", str(stories_dir), port, pid, str(out), mode
        )
        for pid in range(2)
    ]
    results = []
    for p in run_processes(commands, worker_env(4), TIMEOUT):
        assert p.returncode == 0, p.stderr[-6000:]
        results.append(result_of(p.stdout))
    return results


def _assert_close(a, b) -> float:
    import jax

    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    worst = max(jax.tree.leaves(diffs))
    assert worst < 2e-4, worst
    return worst


@pytest.fixture(scope="module")
def small_model(stories_dir, tmp_path_factory) -> pathlib.Path:
    """stories260K cut to 2 layers, saved as a HF folder in 3 safetensors files."""
    import dataclasses

    import jax

    from fedlora_jax.model.convert import load_hf_folder, save_hf_folder

    cfg, base = load_hf_folder(stories_dir)
    base = {**base, "layers": jax.tree.map(lambda x: x[:LAYERS], base["layers"])}
    folder = tmp_path_factory.mktemp("stories2")
    save_hf_folder(
        dataclasses.replace(cfg, num_layers=LAYERS), base, folder, max_shard_bytes=80_000
    )
    assert len(list(folder.glob("*.safetensors"))) >= 3
    return folder


@pytest.fixture(scope="module")
def single(small_model):
    from fake_devices import run_worker

    return run_worker("test_multihost", "_worker_single", str(small_model), devices=1)


def test_two_processes_match_one_and_resume(small_model, tmp_path, single):
    stories_dir = small_model
    t0 = time.perf_counter()
    full = _two_processes(stories_dir, tmp_path / "full", "full")
    wall = time.perf_counter() - t0
    assert [r["primary"] for r in full] == [True, False]
    assert (tmp_path / "full" / "result_full.json").exists()
    # Each process asked only for its own clients' rows (clients=2: two each), every round.
    assert {tuple(map(tuple, r["asked"])) for r in full} == {
        ((0, 1),) * ROUNDS,
        ((2, 3),) * ROUNDS,
    }
    full_diff = _assert_close(full[0]["server"], single["server"])
    assert full[0]["server"] == full[1]["server"]
    for r in _two_processes(stories_dir, tmp_path / "split", "stop"):
        assert "process(es) [1] hold other host-local values" in r["differ"]
    resumed = _two_processes(stories_dir, tmp_path / "split", "resume")
    resume_diff = _assert_close(resumed[0]["server"], full[0]["server"])
    print(f"two-process wall {wall:.1f}s, max diff vs one process {full_diff:.2e}, resumed vs "
          f"uninterrupted {resume_diff:.2e}")  # fmt: skip
