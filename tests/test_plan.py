"""scripts/plan.py: HLO accounting checked by hand, the round's memory by jax's shard shapes."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from fake_devices import run_worker, worker_env

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("plan_script", REPO / "scripts" / "plan.py")
plan = importlib.util.module_from_spec(_spec)
sys.modules["plan_script"] = plan  # dataclasses look their module up
_spec.loader.exec_module(plan)


def test_dot_flops_count_every_loop_iteration():
    def f(x, w):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0]

    x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
    w = jax.ShapeDtypeStruct((10, 128, 96 + 32), jnp.float32)
    compiled = jax.jit(f).lower(x, w).compile()
    stats = plan.hlo_stats(compiled.as_text())
    assert stats.dot_flops == 10 * 2 * 64 * 128 * 128
    assert stats.unknown_trip_counts == 0
    assert not stats.collective_bytes


def _worker_collectives() -> dict:
    """8 fake devices: an all-gather of a [128, 32] f32 array and an all-reduce of [32] f32."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    pl = plan

    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    split, rep = NamedSharding(mesh, P("fsdp")), NamedSharding(mesh, P())
    x = jax.ShapeDtypeStruct((128, 32), jnp.float32)
    gather = jax.jit(lambda a: a * 2, in_shardings=split, out_shardings=rep)
    total = jax.jit(lambda a: a.sum(0), in_shardings=split, out_shardings=rep)
    g = pl.hlo_stats(gather.lower(x).compile().as_text())
    r = pl.hlo_stats(total.lower(x).compile().as_text())
    return {"gather": dict(g.collective_bytes), "reduce": dict(r.collective_bytes)}


def test_collective_bytes_on_fake_devices():
    res = run_worker("test_plan", "_worker_collectives")
    assert res["gather"] == {"all-gather": 128 * 32 * 4}
    assert res["reduce"] == {"all-reduce": 32 * 4}


def _worker_round(mesh_axes: dict, batch: int) -> dict:
    """plan_round for stories260k; the argument bytes XLA assigns vs jax's shard shapes."""
    pl = plan

    from fedlora_jax.federated import distributed as dist
    from fedlora_jax.model.llama import init_random_base

    cfg = pl.model_config("stories260k")
    p = pl.plan_round(cfg, mesh_axes, clients=4, batch=batch, seq=32, dtype="float32")
    mesh = dist.make_mesh(mesh_axes, jax.devices()[: math.prod(mesh_axes.values())])
    base = jax.eval_shape(lambda: init_random_base(jax.random.PRNGKey(0), cfg))
    shards = dist.base_sharding(mesh, base)
    base_bytes = sum(
        math.prod(s.shard_shape(b.shape)) * 4
        for b, s in zip(jax.tree.leaves(base), jax.tree.leaves(shards), strict=True)
    )
    return {
        "argument": p.memory["argument"],
        "base_bytes": base_bytes,
        "flops": p.dot_flops,
        "batch_spec": p.batch_spec,
        "collectives": p.collective_bytes,
    }


def test_round_plan_shards_the_base_and_splits_the_work():
    one = run_worker("test_plan", "_worker_round", {"clients": 1, "fsdp": 1}, 4, devices=1)
    mesh = run_worker("test_plan", "_worker_round", {"clients": 2, "fsdp": 4}, 4, devices=8)
    # stories260K: 260,032 float32 parameters; 704 of them (norms) replicated, the rest / 4.
    assert one["base_bytes"] == 260_032 * 4
    assert mesh["base_bytes"] == ((260_032 - 704) // 4 + 704) * 4
    # XLA's argument buffers: the base shards plus states and batches (small here).
    for r in (one, mesh):
        assert r["base_bytes"] <= r["argument"] < r["base_bytes"] + 200_000
    assert mesh["batch_spec"] == "P('clients', None, 'fsdp')"
    # Work splits over 8 devices (batch over fsdp, clients over clients): per-device FLOPs
    # near 1/8 of the single device's, and the mesh moves weights (all-gathers) around.
    assert 0.9 / 8 < mesh["flops"] / one["flops"] < 1.3 / 8
    assert mesh["collectives"].get("all-gather", 0) > 0
    assert not one["collectives"]


def test_cli_prints_plan_and_rejects_bad_mesh():
    script = str(REPO / "scripts" / "plan.py")
    env = worker_env(1)
    del env["XLA_FLAGS"]  # the script asks for its own fake devices
    ok = subprocess.run(
        [sys.executable, script, "--mesh", "clients=2,fsdp=2", "--clients", "2", "--batch", "2",
         "--seq", "16", "--dtype", "float32"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "memory per device" in ok.stdout and "FLOPs per round" in ok.stdout
    bad = subprocess.run(
        [sys.executable, script, "--mesh", "clients=two"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: --mesh='clients=two': bad entry 'clients=two'; expected axis=size with axis in "
        "clients, fsdp, tensor and size >= 1, e.g. 'clients=2,fsdp=4'"
    ]
    assert bad.stdout == ""
