"""Round time of the engine (all clients in one jitted vmap call) against a Python loop that
calls a jitted single-client update once per client, then aggregates.

    python benchmarks/round_vs_loop.py                       # stories260K, K = 1 4 8
    python benchmarks/round_vs_loop.py --model smollm2-random --seq 32 --clients 1 4

Prints one JSON line per K and a markdown table. Times are wall-clock; "first" includes tracing
and compilation; steady state = median of ``--rounds`` engine and loop rounds, interleaved so a
shared machine's load hits both alike. The loop's compiled update is shared across K (one shape
per client), so only the first K pays its compile.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax.adapters import AdapterConfig
from fedlora_jax.algorithms import ClientTraining, get
from fedlora_jax.federated import engine as E
from fedlora_jax.model.config import LlamaConfig

STORIES = pathlib.Path(__file__).resolve().parents[2] / "shared/data/models/stories260K"
SMOLLM2 = LlamaConfig(  # SmolLM2-135M's shape (random weights; the real GGUF needs a download)
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    tie_word_embeddings=True,
    rope_theta=100000.0,
)


def load_model(name: str, path: pathlib.Path) -> tuple[LlamaConfig, dict]:
    if name == "stories260K":
        from fedlora_jax.model.convert import load_hf_folder

        return load_hf_folder(path)
    from fedlora_jax.model.llama import init_random_base

    return SMOLLM2, init_random_base(jax.random.PRNGKey(0), SMOLLM2)


def batches_for(cfg: LlamaConfig, k: int, steps: int, batch: int, seq: int) -> dict:
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.vocab_size, (k, steps, batch, seq)).astype(np.int32)
    return {"tokens": tokens, "loss_mask": np.ones_like(tokens), "attn_mask": np.ones_like(tokens)}


def engine_round(alg, base, batches, k: int, backend: str):
    """A closure running one engine round (all K clients sampled); the state lives inside."""
    config = E.EngineConfig(backend=backend, chunk_size=max(1, k // 2))
    state = E.init_state(alg, base, k, seed=0)
    sizes = np.ones(k, np.float32)

    def run() -> None:
        nonlocal state
        state, _ = E.run_round(alg, state, base, batches, sizes, config)
        jax.block_until_ready(state.server_state)

    return run


def loop_round(alg, base, batches, k: int):
    """A closure running one round as a Python loop of jitted single-client updates."""
    phase = alg.phases[0]
    server, clients = alg.init(jax.random.PRNGKey(0), base, k)
    update = jax.jit(phase.client_update)
    aggregate = jax.jit(phase.aggregate)
    weights, ids = jnp.ones(k), jnp.arange(k)
    rows = [({name: v[i] for name, v in batches.items()}, jax.random.PRNGKey(i)) for i in range(k)]

    def run() -> None:
        nonlocal server
        payload = phase.broadcast(server, ids)
        uploads = []
        for i, (b, key) in enumerate(rows):
            row = jax.tree.map(lambda x, i=i: x[i], clients)
            uploads.append(update(base, payload, row, b, key)[0])
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *uploads)
        server = jax.block_until_ready(aggregate(server, stacked, weights, ids))

    return run


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(alg, base, batches, k: int, rounds: int, backend: str) -> dict[str, float]:
    """First-round times (trace + compile), then ``rounds`` interleaved engine/loop rounds so
    both see the same machine load; medians."""
    engine, loop = engine_round(alg, base, batches, k, backend), loop_round(alg, base, batches, k)
    first = {"engine_first_s": seconds(engine), "loop_first_s": seconds(loop)}
    e_times, l_times = [], []
    for _ in range(rounds):
        e_times.append(seconds(engine))
        l_times.append(seconds(loop))
    return {
        **first,
        "engine_round_s": statistics.median(e_times),
        "loop_round_s": statistics.median(l_times),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("stories260K", "smollm2-random"), default="stories260K")
    p.add_argument("--model-path", type=pathlib.Path, default=STORIES)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backend", choices=E.BACKENDS, default="vmap")
    p.add_argument("--algorithm", default="fedit")
    args = p.parse_args()

    cfg, base = load_model(args.model, args.model_path)
    training = ClientTraining(model=cfg, adapter=AdapterConfig(r=8), local_steps=args.steps)
    alg = get(args.algorithm)(training)
    rows = []
    for k in args.clients:
        batches = batches_for(cfg, k, args.steps, args.batch, args.seq)
        t = bench(alg, base, batches, k, args.rounds, args.backend)
        row = {
            "model": args.model,
            "device": jax.devices()[0].device_kind,
            "clients": k,
            "steps": args.steps,
            "batch": args.batch,
            "seq": args.seq,
            "backend": args.backend,
            **{name: round(v, 4) for name, v in t.items()},
            "speedup": round(t["loop_round_s"] / t["engine_round_s"], 2),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        "\n| K | engine first round (s) | engine round (s) | loop first (s) | loop round (s) "
        "| loop / engine |\n|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['clients']} | {r['engine_first_s']} | {r['engine_round_s']} | "
            f"{r['loop_first_s']} | {r['loop_round_s']} | {r['speedup']} |"
        )


if __name__ == "__main__":
    main()
