"""The FedLoRA-Optimizer sensitivity study (paper Fig. 1) on a real model and Dolly categories.

Trains one decomposed LoRA per Dolly category, all from ONE shared init (same seed, same data
order per step index), then reports per layer and module, and averaged, how much the A and B
directions (1 - cos) and magnitudes (|Δm|) differ between tasks, with the paper's ratios
(direction A / direction B ≈ 1.7, magnitude B / magnitude A ≈ 41).

    python scripts/sensitivity.py                       # SmolLM2-135M on the CPU (minutes)
    python scripts/sensitivity.py --preset stories260k  # seconds (what the tests run)
    python scripts/sensitivity.py --preset llama2-7b    # a GPU; needs the HF hub or a folder

Writes ``sensitivity.csv`` (per module), ``sensitivity.md`` (table + averages + ratios),
``sensitivity.json`` and ``sensitivity.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from fedlora_jax.adapters import AdapterConfig, init_adapters  # noqa: E402
from fedlora_jax.algorithms.base import ClientTraining  # noqa: E402
from fedlora_jax.algorithms.training import (  # noqa: E402
    local_train,
    make_loss_fn,
    make_optimizer,
)
from fedlora_jax.analysis.sensitivity import METRICS, PAPER_RATIOS, tree_sensitivity  # noqa: E402
from fedlora_jax.data.rows import DataError  # noqa: E402
from fedlora_jax.data.sources import load_dolly  # noqa: E402
from fedlora_jax.data.tokenize import tokenize_examples  # noqa: E402
from fedlora_jax.model.hub import resolve_model  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {"model": "smollm2-135m", "steps": 20, "batch_size": 2, "max_seq_len": 128,
                     "lr": 1e-3, "dtype": "float32"},
    "stories260k": {"model": "stories260k", "steps": 4, "batch_size": 2, "max_seq_len": 256,
                    "lr": 5e-3, "dtype": "float32"},
    "llama2-7b": {"model": "llama2-7b", "steps": 100, "batch_size": 8, "max_seq_len": 512,
                  "lr": 3e-4, "dtype": "bfloat16"},
}  # fmt: skip
DEFAULT_CATEGORIES = "closed_qa,information_extraction,open_qa"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="smollm2-135m", choices=sorted(PRESETS))
    p.add_argument("--model", help="model spec (alias, folder, hub id); default from the preset")
    p.add_argument(
        "--categories",
        default=DEFAULT_CATEGORIES,
        help="comma-separated Dolly categories (>= 2), one task each",
    )
    p.add_argument("--steps", type=int, help="training steps per task")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-seq-len", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="qv", help="adapter target preset or regex")
    p.add_argument("--norm-axis", default="row", choices=("row", "col"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/sensitivity", help="output folder")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.steps < 1 or args.batch_size < 1 or args.max_seq_len < 8 or args.lr <= 0:
        p.error("--steps and --batch-size must be >= 1, --max-seq-len >= 8, --lr > 0")
    return args


def task_batches(
    examples: list, categories: list[str], tokenizer: Any, args: argparse.Namespace
) -> dict[str, np.ndarray]:
    """[tasks, steps, batch, seq] int32 batches; step s of every task draws with the same rng."""
    by_cat = {c: [e for e in examples if e.category == c] for c in categories}
    out: dict[str, list[np.ndarray]] = {"tokens": [], "loss_mask": [], "attn_mask": []}
    for c in categories:
        if not by_cat[c]:
            known = sorted({e.category for e in examples})
            raise DataError(f"--categories: {c!r} has no Dolly rows; known: {', '.join(known)}")
        ts, _ = tokenize_examples(by_cat[c], tokenizer, max_seq_len=args.max_seq_len)
        if len(ts) == 0:
            raise DataError(f"--max-seq-len={args.max_seq_len}: no {c!r} row fits; raise it")
        need = args.steps * args.batch_size
        rng = np.random.default_rng(args.seed)
        idx = rng.choice(len(ts), need, replace=len(ts) < need).reshape(args.steps, -1)
        out["tokens"].append(ts.tokens[idx])
        out["loss_mask"].append(ts.loss_mask()[idx])
        out["attn_mask"].append(ts.attn_mask()[idx])
    return {k: np.stack(v).astype(np.int32) for k, v in out.items()}


def train_tasks(args: argparse.Namespace, categories: list[str]) -> tuple[list, Any, str]:
    """One decomposed adapter per task from the shared init (tasks vmapped in one jit)."""
    dtype = jnp.dtype(args.dtype)
    resolved = resolve_model(args.model, dtype=dtype)
    adapter = AdapterConfig(
        kind="decomposed",
        r=args.r,
        alpha=args.alpha,
        dropout=0.0,
        targets=args.targets,
        norm_axis=args.norm_axis,
    )
    training = ClientTraining(
        model=resolved.cfg,
        adapter=adapter,
        local_steps=args.steps,
        lr=args.lr,
        compute_dtype=args.dtype,
        remat=args.dtype != "float32",
    )
    batches = task_batches(load_dolly(verbose=False).examples, categories, resolved.tokenizer, args)
    init = init_adapters(jax.random.PRNGKey(args.seed), resolved.cfg, adapter)
    labels = lambda p: jax.tree.map(lambda _: "shared", p)  # noqa: E731  (every component trains)
    tx = make_optimizer(training, labels, args.steps)
    loss_fn = make_loss_fn(training)

    def train(task_batches: dict[str, jax.Array]) -> tuple[Any, dict[str, jax.Array]]:
        params, _, metrics = local_train(
            loss_fn,
            resolved.base,
            init,
            tx,
            tx.init(init),
            task_batches,
            jax.random.PRNGKey(args.seed),
            labels,
        )
        return params, metrics

    trained, metrics = jax.jit(jax.vmap(train))(batches)
    trees = [
        jax.tree.map(lambda x, i=i: np.asarray(x[i], np.float32), trained)
        for i in range(len(categories))
    ]
    losses = {
        c: (float(metrics["loss_first"][i]), float(metrics["loss_last"][i]))
        for i, c in enumerate(categories)
    }
    return trees, losses, resolved.source


def write_outputs(out: pathlib.Path, rows: list[dict], summary: dict, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "sensitivity.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["module", "layer", "name", *METRICS])
        writer.writeheader()
        writer.writerows(rows)
    (out / "sensitivity.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "modules": rows}, indent=1)
    )
    lines = [
        f"# Sensitivity of decomposed LoRA components across tasks ({meta['model']})", "",
        f"Tasks: {', '.join(meta['categories'])}; {meta['steps']} steps x batch "
        f"{meta['batch_size']} x seq {meta['max_seq_len']}, lr {meta['lr']}, r {meta['r']}, "
        f"targets {meta['targets']}, {meta['norm_axis']}-wise.", "",
        "| module | 1-cos A_D | 1-cos B_D | abs dA_M | abs dB_M |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {r['module']} | {r['dir_A']:.3e} | {r['dir_B']:.3e} | {r['mag_A']:.3e} | "
          f"{r['mag_B']:.3e} |" for r in rows],
        f"| **mean** | {summary['dir_A']:.3e} | {summary['dir_B']:.3e} | {summary['mag_A']:.3e} "
        f"| {summary['mag_B']:.3e} |", "",
        "| ratio | measured | paper |", "| --- | --- | --- |",
        *[f"| {k} | {summary[k]:.2f} | {v} |" for k, v in PAPER_RATIOS.items()], "",
    ]  # fmt: skip
    (out / "sensitivity.md").write_text("\n".join(lines))
    plot(out / "sensitivity.png", rows, summary, meta)


def plot(path: pathlib.Path, rows: list[dict], summary: dict, meta: dict) -> None:
    """Per-layer means of the four changes (direction left, magnitude right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({r["layer"] for r in rows})
    per_layer = {
        k: [np.mean([r[k] for r in rows if r["layer"] == i]) for i in layers] for k in METRICS
    }
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, (a, b, title, ratio) in zip(
        axes,
        (
            ("dir_A", "dir_B", "direction change (1 - cos)", "dir_A/dir_B"),
            ("mag_A", "mag_B", "magnitude change |Δm|", "mag_B/mag_A"),
        ),
        strict=True,
    ):
        ax.plot(layers, per_layer[a], "o-", label="A")
        ax.plot(layers, per_layer[b], "s-", label="B")
        ax.set_title(f"{title}\n{ratio} = {summary[ratio]:.2f} (paper {PAPER_RATIOS[ratio]})")
        ax.set_xlabel("layer")
        ax.set_yscale("log")
        ax.legend()
    fig.suptitle(f"{meta['model']}: {', '.join(meta['categories'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    if len(categories) < 2:
        print(
            f"error: --categories needs >= 2 categories, got {args.categories!r}", file=sys.stderr
        )
        return 2
    start = time.perf_counter()
    try:
        trees, losses, source = train_tasks(args, categories)
    except (DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows, summary = tree_sensitivity(trees, args.norm_axis)
    meta = {
        **{k: v for k, v in vars(args).items() if k != "out"},
        "categories": categories,
        "model_source": source,
        "losses_first_last": losses,
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_outputs(pathlib.Path(args.out), rows, summary, meta)
    print(
        f"{args.model}: dir_A/dir_B = {summary['dir_A/dir_B']:.2f} (paper 1.7), "
        f"mag_B/mag_A = {summary['mag_B/mag_A']:.2f} (paper 41); losses {losses}; "
        f"{meta['seconds']} s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
