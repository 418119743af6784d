"""Time one federated round (K clients × S local steps × batch × seq): our engine (FedIT; vmap
and chunked backends) against the PyTorch + PEFT OpenFedLLM-pattern reference
(``torch_reference.py``), on the same weights, data and hyperparameters, in one run.

    PYTHONPATH=. python benchmarks/federated_round.py --preset small smollm2 --out results/cpu
    PYTHONPATH=. python benchmarks/federated_round.py --preset llama2-7b --device gpu \
        --remat both --out results/gpu

Each (implementation, preset, K, remat) cell runs in a fresh process (``--in-process`` to
skip that), so its peak memory is its own: host RSS over the steady rounds on CPU, the allocator
peak on GPU (JAX ``memory_stats``, ``torch.cuda.max_memory_allocated``). Round time is the
median over ``--rounds`` rounds after a first one; compile = first − steady (JAX). After round 1
every cell saves the global adapter and the table shows max |ours − reference|: the two sides
compute the same round. Writes ``<out>.md`` and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
from typing import Any

import bench_measure as measure
import bench_weights as weights
import numpy as np
from round_vs_loop import SMOLLM2, batches_for

from fedlora_jax.model.config import LlamaConfig

HERE = pathlib.Path(__file__).resolve().parent
MiB = 2**20
H100_SXM_BF16_TFLOPS = 989.0  # dense, no sparsity


@dataclasses.dataclass(frozen=True)
class Preset:
    """A model shape and the round shape it is timed at (every field overridable on the CLI)."""

    model: LlamaConfig
    clients: tuple[int, ...]
    steps: int
    batch: int
    seq: int
    r: int = 8
    targets: str = "qv"
    dtype: str = "float32"


PRESETS = {
    # stories260K's shape (the tests' size)
    "tiny": Preset(
        LlamaConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=172,
            num_layers=5,
            num_heads=8,
            num_kv_heads=4,
            head_dim=8,
            tie_word_embeddings=True,
        ),
        clients=(2,),
        steps=1,
        batch=2,
        seq=16,
    ),
    # llama2.c stories15M's shape: a small LLaMA with the Llama-2 32k vocabulary
    "small": Preset(
        LlamaConfig(
            vocab_size=32000,
            hidden_size=288,
            intermediate_size=768,
            num_layers=6,
            num_heads=6,
            num_kv_heads=6,
            head_dim=48,
            tie_word_embeddings=True,
        ),
        clients=(1, 4, 8, 16),
        steps=2,
        batch=2,
        seq=64,
    ),
    "smollm2": Preset(SMOLLM2, clients=(1, 4, 8), steps=2, batch=1, seq=64),
    "llama2-7b": Preset(
        LlamaConfig(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_layers=32,
            num_heads=32,
            num_kv_heads=32,
            head_dim=128,
            tie_word_embeddings=False,
        ),
        clients=(8,),
        steps=2,
        batch=1,
        seq=512,
        r=16,
        targets="attn",
        dtype="bfloat16",
    ),
}
HP = {"lr": 1e-3, "weight_decay": 0.0, "grad_clip": 1.0, "alpha_over_r": 2.0}


# ----------------------------------------------------------------------------- FLOPs


def flops_per_token(cfg: LlamaConfig, r: int, targets: str, seq: int) -> float:
    """Model FLOPs of one LoRA training step per token.

    Frozen linear weights N (all layer matmuls + the LM head; the embedding is a lookup):
    forward 2N, backward to the activations 2N, no weight gradient → 4N. LoRA weights N_lora:
    6 N_lora (they also get weight gradients). Attention (no weights), full T×T scores, per layer
    and token: forward QKᵀ + PV = 4·T·d_q, backward twice that → 12·L·T·d_q.
    """
    from fedlora_jax.adapters import AdapterConfig, select_targets
    from fedlora_jax.model.config import linear_specs

    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    dq, dkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    n_frozen = L * (2 * d * dq + 2 * d * dkv + 3 * d * f) + d * cfg.vocab_size
    paths = select_targets(L, AdapterConfig(r=r, targets=targets))
    n_lora = sum(r * sum(linear_specs(cfg)[p]) for p in paths)
    return 4.0 * n_frozen + 6.0 * n_lora + 12.0 * L * seq * dq


# ----------------------------------------------------------------------------- cells


def _peft_key(path: str, factor: str) -> str:
    from fedlora_jax.adapters.peft import hf_module_name

    return f"base_model.model.{hf_module_name(path)}.lora_{factor}.weight"


def adapters_to_npz(tree: dict, path: str | pathlib.Path) -> None:
    """Our lora tree -> npz keyed like ``get_peft_model_state_dict``."""
    from fedlora_jax.adapters import leaf_paths
    from fedlora_jax.adapters.base import get_path

    arrays = {}
    for p in leaf_paths(tree):
        leaf = get_path(tree, p)
        for factor in ("A", "B"):
            arrays[_peft_key(p, factor)] = np.asarray(leaf[factor], np.float32)
    np.savez(path, **arrays)


def adapters_from_npz(path: str | pathlib.Path, template: dict) -> dict:
    """Inverse of ``adapters_to_npz`` over the module paths of ``template``."""
    import jax.numpy as jnp

    from fedlora_jax.adapters import leaf_paths
    from fedlora_jax.adapters.base import set_path

    data = np.load(path)
    tree: dict = {}
    for p in leaf_paths(template):
        set_path(tree, p, {f: jnp.asarray(data[_peft_key(p, f)]) for f in ("A", "B")})
    return tree


def run_jax_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """FedIT rounds through ``federated.engine.run_round``; see the module docstring."""
    measure.pin_threads(spec.get("threads"))
    import jax
    import jax.numpy as jnp

    from fedlora_jax.adapters import AdapterConfig
    from fedlora_jax.algorithms import ClientTraining, get
    from fedlora_jax.federated import engine as E

    platform_ = jax.devices()[0].platform
    if spec["device"] == "gpu" and platform_ != "gpu":
        raise SystemExit(f"--device gpu: JAX sees no GPU (platform {platform_!r})")
    cfg = LlamaConfig.from_hf_dict(spec["hf"])
    dtype = jnp.dtype(spec["dtype"])
    # cast on the host, so the device never holds a float32 copy of a bfloat16 base
    leaves = weights.random_leaves(spec["hf"], spec["seed"])
    base = weights.nest((p, jax.device_put(x.astype(dtype))) for p, x in leaves)
    lora = spec["lora"]
    acfg = AdapterConfig(kind="lora", r=lora["r"], alpha=lora["alpha"], targets=lora["targets"])
    hp = spec["hp"]
    training = ClientTraining(
        model=cfg,
        adapter=acfg,
        local_steps=spec["steps"],
        lr=hp["lr"],
        weight_decay=hp["weight_decay"],
        grad_clip=hp["grad_clip"],
        compute_dtype=spec["dtype"],
        remat=spec["remat"],
    )
    alg = get("fedit")(training)
    k = spec["k"]
    state = E.init_state(alg, base, k, seed=spec["seed"])
    init = adapters_from_npz(spec["init_adapters"], state.server_state.params)
    state = state._replace(server_state=state.server_state.replace(params=init))
    config = E.EngineConfig(backend=spec["backend"], chunk_size=min(spec["chunk_size"], k))
    data = dict(np.load(spec["batches"]))
    sizes = np.asarray(spec["sizes"], np.float32)
    box = {"state": state, "rounds": 0}

    def one_round() -> None:
        new, _ = E.run_round(alg, box["state"], base, data, sizes, config)
        jax.block_until_ready(new)
        box["state"], box["rounds"] = new, box["rounds"] + 1
        if box["rounds"] == 1 and spec.get("check_out"):
            adapters_to_npz(jax.device_get(new.server_state.params), spec["check_out"])

    gpu = platform_ == "gpu"
    timing = measure.time_rounds(
        one_round, spec["rounds"], after_first=None if gpu else measure.reset_peak_rss
    )
    if gpu:
        peak = jax.devices()[0].memory_stats().get("peak_bytes_in_use", 0)
    else:
        peak = measure.peak_rss_bytes()
    return {
        **timing,
        "compile_s": max(timing["first_s"] - timing["round_s"], 0.0),
        "peak_bytes": peak,
    }


def run_cell(spec: dict[str, Any], in_process: bool, workdir: pathlib.Path) -> dict[str, Any]:
    """One cell, in a fresh process unless ``in_process``."""
    if in_process:
        if spec["impl"] == "torch":
            import torch_reference

            return torch_reference.run_cell(spec)
        return run_jax_cell(spec)
    name = f"{spec['impl']}_{spec['backend']}_k{spec['k']}_remat{int(spec['remat'])}"
    spec_path, result_path = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
    measure.write_json(spec_path, spec)
    script = HERE / ("torch_reference.py" if spec["impl"] == "torch" else "federated_round.py")
    cmd = [sys.executable, str(script), "--cell", str(spec_path), "--result", str(result_path)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"cell {name} failed:\n{done.stderr[-3000:]}")
    return measure.read_json(result_path)


# ----------------------------------------------------------------------------- the grid


def base_bytes(hf: dict[str, Any], dtype: str) -> int:
    itemsize = np.dtype("float32").itemsize if dtype == "float32" else 2
    return sum(int(np.prod(s)) for s in weights.leaf_shapes(hf).values()) * itemsize


def run_preset(name: str, args: argparse.Namespace, workdir: pathlib.Path) -> list[dict]:
    """Every cell of one preset; rows carry the measured figures and the derived ones."""
    import jax

    from fedlora_jax.adapters import AdapterConfig, init_adapters, select_targets

    preset = PRESETS[name]
    cfg = preset.model
    steps, batch, seq = (
        args.steps or preset.steps,
        args.batch or preset.batch,
        args.seq or preset.seq,
    )
    r = args.r or preset.r
    dtype = args.dtype or preset.dtype
    hf = cfg.to_hf_dict()
    acfg = AdapterConfig(kind="lora", r=r, alpha=HP["alpha_over_r"] * r, targets=preset.targets)
    init_path = workdir / f"{name}_init_adapters.npz"
    adapters_to_npz(init_adapters(jax.random.PRNGKey(args.seed), cfg, acfg), init_path)
    targets = sorted({p.rsplit(".", 1)[1] for p in select_targets(cfg.num_layers, acfg)})
    fpt = flops_per_token(cfg, r, preset.targets, seq)
    common = {
        "hf": hf,
        "seed": args.seed,
        "dtype": dtype,
        "steps": steps,
        "rounds": args.rounds,
        "device": args.device,
        "threads": args.threads,
        "chunk_size": args.chunk_size,
        "init_adapters": str(init_path),
        "hp": {k: HP[k] for k in ("lr", "weight_decay", "grad_clip")},
        "lora": {
            "r": r,
            "alpha": acfg.alpha,
            "dropout": 0.0,
            "targets": preset.targets,
            "target_modules": targets,
        },
    }
    rows = []
    for k in args.clients or preset.clients:
        batches_path = workdir / f"{name}_k{k}_batches.npz"
        np.savez(batches_path, **batches_for(cfg, k, steps, batch, seq))
        for remat in args.remat:
            cell = {
                **common,
                "k": k,
                "remat": remat,
                "batches": str(batches_path),
                "sizes": [100.0 + 10.0 * i for i in range(k)],
            }
            impls = [("jax", b) for b in args.backends]
            impls += [] if args.skip_torch else [("torch", "loop")]
            results = {}
            for impl, backend in impls:
                check = workdir / f"{name}_k{k}_{impl}_{backend}_remat{int(remat)}_round1.npz"
                spec = {**cell, "impl": impl, "backend": backend, "check_out": str(check)}
                res = run_cell(spec, args.in_process, workdir)
                tokens = k * steps * batch * seq
                row = {
                    "preset": name,
                    "impl": impl,
                    "backend": backend,
                    "remat": remat,
                    "k": k,
                    "steps": steps,
                    "batch": batch,
                    "seq": seq,
                    "r": r,
                    "targets": preset.targets,
                    "dtype": dtype,
                    "first_s": res["first_s"],
                    "round_s": res["round_s"],
                    "rounds_s": res["rounds_s"],
                    "compile_s": res.get("compile_s"),
                    "tokens_per_s": tokens / res["round_s"],
                    "client_steps_per_s": k * steps / res["round_s"],
                    "tflops": fpt * tokens / res["round_s"] / 1e12,
                    "peak_mib": res["peak_bytes"] / MiB,
                    "base_mib": base_bytes(hf, dtype) / MiB,
                    "check": str(check),
                }
                if args.peak_tflops:
                    row["mfu"] = row["tflops"] / args.peak_tflops
                results[(impl, backend)] = row
                rows.append(row)
                print(_row_line(row), flush=True)
            ref = results.get(("torch", "loop"))
            if ref is not None:
                want = dict(np.load(ref["check"]))
                for (impl, _), row in results.items():
                    if impl == "jax":
                        got = np.load(row["check"])
                        row["ratio_vs_ref"] = row["round_s"] / ref["round_s"]
                        row["max_abs_diff_vs_ref"] = max(
                            float(np.max(np.abs(got[n] - want[n]))) for n in want
                        )
    return rows


# ----------------------------------------------------------------------------- output


def _fmt(x: Any, spec: str = ".3g") -> str:
    return "–" if x is None else format(x, spec)


def _row_line(row: dict) -> str:
    return (
        f"{row['preset']} {row['impl']}/{row['backend']} K={row['k']} remat={row['remat']}: "
        f"round {row['round_s']:.3f}s first {row['first_s']:.2f}s "
        f"peak {row['peak_mib']:.0f} MiB"
    )


def markdown(rows: list[dict], meta: dict[str, Any]) -> str:
    mfu = any("mfu" in r for r in rows)
    head = (
        [
            "model",
            "impl",
            "K",
            "S×B×T",
            "remat",
            "round s",
            "first s",
            "compile s",
            "tokens/s",
            "client-steps/s",
            "TFLOP/s",
        ]
        + (["MFU"] if mfu else [])
        + ["peak MiB", "ours ÷ ref", "max |Δ| vs ref"]
    )
    out = [
        f"Machine: {meta['machine']}; {meta['threads']} thread(s) per side; load average "
        f"at start {meta['load_start']}, at end {meta['load_end']}.",
        f"Command: `{meta['command']}`",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        impl = "torch+PEFT" if r["impl"] == "torch" else f"ours ({r['backend']})"
        cells = [
            r["preset"],
            impl,
            str(r["k"]),
            f"{r['steps']}×{r['batch']}×{r['seq']}",
            "on" if r["remat"] else "off",
            _fmt(r["round_s"]),
            _fmt(r["first_s"]),
            _fmt(r["compile_s"]),
            _fmt(r["tokens_per_s"], ".0f"),
            _fmt(r["client_steps_per_s"]),
            _fmt(r["tflops"], ".3f"),
        ]
        cells += [_fmt(r.get("mfu"), ".1%")] if mfu else []
        cells += [
            _fmt(r["peak_mib"], ".0f"),
            _fmt(r.get("ratio_vs_ref"), ".2f"),
            _fmt(r.get("max_abs_diff_vs_ref"), ".1e"),
        ]
        out.append("| " + " | ".join(cells) + " |")
    scaling = memory_slopes(rows)
    if scaling:
        out += [
            "",
            "Peak memory against K (least-squares slope over the K values measured):",
            "",
            "| model | impl | remat | K values | slope MiB/client | intercept MiB | base MiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in scaling:
            out.append(
                f"| {s['preset']} | {s['impl']} | {'on' if s['remat'] else 'off'} | "
                f"{s['ks']} | {s['slope_mib']:.1f} | {s['intercept_mib']:.0f} | "
                f"{s['base_mib']:.0f} |"
            )
    return "\n".join(out) + "\n"


def memory_slopes(rows: list[dict]) -> list[dict]:
    """Fit peak = intercept + slope·K per (preset, implementation, remat) with ≥ 2 K values."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["preset"], r["impl"], r["backend"], r["remat"]), []).append(r)
    out = []
    for (preset, impl, backend, remat), rs in groups.items():
        ks = sorted({r["k"] for r in rs})
        if len(ks) < 2:
            continue
        slope, intercept = np.polyfit([r["k"] for r in rs], [r["peak_mib"] for r in rs], 1)
        label = "torch+PEFT" if impl == "torch" else f"ours ({backend})"
        out.append(
            {
                "preset": preset,
                "impl": label,
                "remat": remat,
                "ks": ks,
                "slope_mib": float(slope),
                "intercept_mib": float(intercept),
                "base_mib": rs[0]["base_mib"],
            }
        )
    return out


def machine() -> str:
    import jax

    dev = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(
            (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu
        )
    return f"{cpu}, {os.cpu_count()} CPUs, JAX {jax.__version__} on {dev.device_kind}"


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=["small", "smollm2"])
    p.add_argument("--clients", type=int, nargs="+", help="K values (default: the preset's)")
    p.add_argument("--steps", type=int, help="local steps S per client per round")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--r", type=int, help="LoRA rank (alpha = 2r)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"))
    p.add_argument("--rounds", type=int, default=2, help="timed rounds after the first")
    p.add_argument(
        "--backends", nargs="+", choices=("vmap", "chunked"), default=["vmap", "chunked"]
    )
    p.add_argument("--chunk-size", type=int, default=2, help="clients per chunk (chunked)")
    p.add_argument("--remat", choices=("off", "on", "both"), default="off")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument(
        "--peak-tflops",
        type=float,
        help=f"device peak for MFU (GPU default {H100_SXM_BF16_TFLOPS}, H100 SXM bf16)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads for both sides (affinity + torch.set_num_threads); "
        "default: all the process may use",
    )
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--in-process", action="store_true", help="run cells in this process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, help="write <out>.md and <out>.json")
    p.add_argument("--cell", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.remat = {"off": [False], "on": [True], "both": [False, True]}[args.remat]
    if args.device == "gpu" and args.peak_tflops is None:
        args.peak_tflops = H100_SXM_BF16_TFLOPS
    for name in ("clients", "steps", "batch", "seq", "r", "rounds", "chunk_size", "threads"):
        values = getattr(args, name)
        if values is not None and min(np.atleast_1d(values)) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {values}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.cell:
        measure.write_json(args.result, run_jax_cell(measure.read_json(args.cell)))
        return []
    meta = {
        "machine": machine(),
        "threads": args.threads or len(os.sched_getaffinity(0)),
        "load_start": [round(x, 2) for x in os.getloadavg()],
        "command": " ".join(
            ["python", f"benchmarks/{pathlib.Path(__file__).name}", *(argv or sys.argv[1:])]
        ),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fedround_") as tmp:
        for name in args.preset:
            rows += run_preset(name, args, pathlib.Path(tmp))
    for r in rows:
        r.pop("check")
    meta["load_end"] = [round(x, 2) for x in os.getloadavg()]
    text = markdown(rows, meta)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        measure.write_json(
            args.out.with_suffix(".json"),
            {"meta": meta, "rows": rows, "memory_slopes": memory_slopes(rows)},
        )
    return rows


if __name__ == "__main__":
    main()
