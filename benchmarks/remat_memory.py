"""Memory of one LoRA training step under each remat policy, and full-logits vs chunked loss.

    PYTHONPATH=. python benchmarks/remat_memory.py [--batch 4 --seq 256 --clients 4]

XLA's own accounting of the compiled value-and-grad program (``memory_analysis()``: temporary
buffers = activations kept for the backward + scratch), for the SmolLM2-135M shape (random
weights), LoRA r=8 on q,v, fp32, ``--clients`` clients vmapped as in the engine. Deterministic
(no timing, no load sensitivity): the figure is what the program needs, not what a shared machine
happened to show. Prints a markdown table.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from round_vs_loop import SMOLLM2

from fedlora_jax.adapters import AdapterConfig, init_adapters
from fedlora_jax.model import llama
from fedlora_jax.model.loss import lm_loss, lm_loss_from_hidden

MiB = 2**20
ACFG = AdapterConfig(kind="lora", r=8, alpha=16.0, targets="qv")


def step_fn(remat: str, chunked: bool):
    """Mean response NLL of K clients (vmapped), its gradient w.r.t. the adapters."""

    def loss(base, adapters, tokens):
        ones = jnp.ones_like(tokens)
        if chunked:
            h = llama.hidden(base, adapters, tokens, ones, cfg=SMOLLM2, adapter_cfg=ACFG,
                             remat=remat)  # fmt: skip
            total, n = lm_loss_from_hidden(base, h, tokens, ones, cfg=SMOLLM2)
        else:
            logits = llama.apply(base, adapters, tokens, ones, cfg=SMOLLM2, adapter_cfg=ACFG,
                                 remat=remat)  # fmt: skip
            total, n = lm_loss(logits, tokens, ones)
        return total / n

    grad = jax.grad(loss, argnums=1)
    return jax.jit(jax.vmap(grad, in_axes=(None, 0, 0)))


def temp_mib(remat: str, chunked: bool, base, adapters, tokens) -> float:
    compiled = step_fn(remat, chunked).lower(base, adapters, tokens).compile()
    return compiled.memory_analysis().temp_size_in_bytes / MiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--clients", type=int, default=4)
    args = p.parse_args()
    shapes = jax.eval_shape(lambda: llama.init_random_base(jax.random.PRNGKey(0), SMOLLM2))
    base = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    one = init_adapters(jax.random.PRNGKey(0), SMOLLM2, ACFG)
    adapters = jax.tree.map(lambda x: jnp.stack([x] * args.clients), one)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, SMOLLM2.vocab_size, (args.clients, args.batch, args.seq))
    tokens = jnp.asarray(tokens, jnp.int32)
    print(
        f"SmolLM2-135M shape, K={args.clients} x batch {args.batch} x seq {args.seq}, fp32, "
        "LoRA r=8 q,v: XLA temporary memory of the vmapped value-and-grad program (MiB)\n"
    )
    print("| remat policy | chunked loss | full logits |\n|---|---|---|")
    for remat in llama.REMAT_POLICIES:
        chunked = temp_mib(remat, True, base, adapters, tokens)
        full = temp_mib(remat, False, base, adapters, tokens)
        print(f"| {remat} | {chunked:.0f} | {full:.0f} |", flush=True)


if __name__ == "__main__":
    main()
