"""Forward+backward step time of the JAX model vs transformers' torch model, CPU, fp32.

SmolLM2-135M-shaped random model (30 layers, d 576, ffn 1536, 9 heads / 3 kv, vocab 49152, tied),
batch 4 x 256. Two steps: "full" (gradients for every base weight, no adapter) and "lora"
(LoRA r=8 on q,v; gradients for the adapter only; torch side uses peft). Reports the JAX compile
time separately from the steady-state time (median of --steps timed calls after a warm-up).

    python benchmarks/step_time.py [--steps 3] [--layers 30] [--skip-torch]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax.adapters import AdapterConfig, init_adapters
from fedlora_jax.model import llama
from fedlora_jax.model.config import LlamaConfig
from fedlora_jax.model.loss import lm_loss


def smollm2_shape(layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=layers,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    )


def _time(fn: Callable[[], object], steps: int) -> tuple[float, float]:
    """(first call, median of ``steps`` further calls) in seconds."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def bench_jax(cfg: LlamaConfig, tokens: np.ndarray, steps: int) -> dict[str, tuple[float, float]]:
    base = llama.init_random_base(jax.random.PRNGKey(0), cfg)
    acfg = AdapterConfig(kind="lora", r=8, alpha=16.0, targets="qv")
    adapters = init_adapters(jax.random.PRNGKey(1), cfg, acfg)
    tok = jnp.asarray(tokens)
    mask = jnp.ones_like(tok)

    def loss(base, adapters, a_cfg):
        logits = llama.apply(base, adapters, tok, mask, cfg=cfg, adapter_cfg=a_cfg)
        total, n = lm_loss(logits, tok, mask)
        return total / n

    # base is an argument, never a closed-over constant (XLA would constant-fold the weights)
    full = jax.jit(jax.value_and_grad(lambda b, a: loss(b, None, None)))
    lora = jax.jit(jax.value_and_grad(lambda a, b: loss(b, a, acfg)))
    out = {}
    for name, fn, args in [("full", full, (base, None)), ("lora", lora, (adapters, base))]:
        t0 = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = time.perf_counter() - t0
        _, steady = _time(lambda c=compiled, args=args: jax.block_until_ready(c(*args)), steps)
        out[name] = (compile_s, steady)
    return out


def bench_torch(cfg: LlamaConfig, tokens: np.ndarray, steps: int) -> dict[str, float]:
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf_dict()))
    ids = torch.tensor(tokens.astype(np.int64))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    out = {"full": _time(step, steps)[1]}
    lcfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(model, lcfg)
    out["lora"] = _time(step, steps)[1]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args()
    cfg = smollm2_shape(args.layers)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq))
    tokens = tokens.astype(np.int32)
    jx = bench_jax(cfg, tokens, args.steps)
    pt = {} if args.skip_torch else bench_torch(cfg, tokens, args.steps)
    print(
        f"fwd+bwd, batch {args.batch}x{args.seq}, {args.layers} layers, fp32, "
        f"{jax.devices()[0].platform}, median of {args.steps}"
    )
    print(f"{'step':<6}{'jax compile s':>15}{'jax step s':>12}{'torch step s':>14}")
    for name, (compile_s, steady) in jx.items():
        torch_s = f"{pt[name]:14.2f}" if name in pt else f"{'-':>14}"
        print(f"{name:<6}{compile_s:15.2f}{steady:12.2f}{torch_s}")


if __name__ == "__main__":
    main()
