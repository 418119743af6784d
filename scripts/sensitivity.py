"""The FedLoRA-Optimizer sensitivity study (paper Fig. 1): how A's and B's directions and
magnitudes differ between adapters trained on different tasks from ONE shared init.

Protocols (``--protocol``, comma-separated, run one after the other on the same batches):

- ``lora``: standard LoRA with PEFT init (A Kaiming-uniform, B = 0), split into norms and
  directions after training, scored row-wise and column-wise (the split is free);
- ``decomposed``: the decomposed adapter (B_M = 0, random B_D) trained directly, its learned
  parameters scored (``--norm-axis``). Its B_D gets gradient only through B_M ≈ 0 and Adam moves
  every magnitude by ≈ steps × lr, so its ratios mostly reflect the init and the optimizer.

With ``--control`` (default) the first task is trained a second time on another draw of its own
rows; the difference between the two is the within-task (data-order) floor of every metric.

    python scripts/sensitivity.py                       # SmolLM2-135M on the CPU
    python scripts/sensitivity.py --preset stories260k  # seconds (what the tests run)
    python scripts/sensitivity.py --preset llama2-7b    # a GPU; needs the HF hub or a folder

Writes to ``--out``: ``sensitivity.md`` (side-by-side table with the paper's 1.7 / 41),
``sensitivity.csv`` (per protocol and module), ``sensitivity.json`` (everything, loss curves
included), ``sensitivity.png`` (per layer), ``loss_curves.png``, and the short
``{protocol: {dir_A_over_dir_B, mag_B_over_mag_A_abs, mag_B_over_mag_A_rel, steps, verdict}}``
to ``--summary`` (default ``<out>/sensitivity_summary.json``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
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
from fedlora_jax.algorithms.training import (  # noqa: E402
    ClientTraining,
    local_train,
    make_loss_fn,
    make_optimizer,
)
from fedlora_jax.analysis.sensitivity import (  # noqa: E402
    METRICS,
    PAPER_RATIOS,
    PROTOCOLS,
    RATIOS,
    protocol_leaves,
    ratios,
    tree_sensitivity,
    verdict,
)
from fedlora_jax.data.rows import DataError  # noqa: E402
from fedlora_jax.data.sources import load_dolly, load_natural_instructions  # noqa: E402
from fedlora_jax.data.tokenize import tokenize_examples  # noqa: E402
from fedlora_jax.model.hub import resolve_model  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {"model": "smollm2-135m", "steps": 60, "batch_size": 1, "max_seq_len": 128,
                     "lr": 1e-3, "dtype": "float32"},
    "stories260k": {"model": "stories260k", "steps": 4, "batch_size": 2, "max_seq_len": 256,
                    "lr": 5e-3, "dtype": "float32"},
    "llama2-7b": {"model": "llama2-7b", "steps": 300, "batch_size": 8, "max_seq_len": 512,
                  "lr": 3e-4, "dtype": "bfloat16"},
}  # fmt: skip
SOURCES = {"dolly": load_dolly, "natural_instructions": load_natural_instructions}
DEFAULT_TASKS = {
    "dolly": "closed_qa,information_extraction,open_qa",
    "natural_instructions": "",  # the first three tasks of the shipped file
}
SMOOTH = 10  # steps in the loss curves' moving average


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="smollm2-135m", choices=sorted(PRESETS))
    p.add_argument("--model", help="model spec (alias, folder, hub id); default from the preset")
    p.add_argument(
        "--protocol", default=",".join(PROTOCOLS), help="comma-separated: lora,decomposed"
    )
    p.add_argument("--source", default="dolly", choices=sorted(SOURCES))
    p.add_argument(
        "--tasks",
        help="comma-separated tasks (>= 2): Dolly categories or NI task names; "
        "default closed_qa,information_extraction,open_qa (Dolly), the first three (NI)",
    )
    p.add_argument(
        "--control",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train the first task on a second draw of its rows (the noise floor)",
    )
    p.add_argument("--steps", type=int, help="training steps per task")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-seq-len", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="qv", help="adapter target preset or regex")
    p.add_argument(
        "--norm-axis",
        default="row",
        choices=("row", "col"),
        help="the decomposed protocol's training axis (lora is scored on both)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/sensitivity", help="output folder")
    p.add_argument(
        "--summary", help="short JSON summary path; default <out>/sensitivity_summary.json"
    )
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.steps < 1 or args.batch_size < 1 or args.max_seq_len < 8 or args.lr <= 0:
        p.error("--steps and --batch-size must be >= 1, --max-seq-len >= 8, --lr > 0")
    return args


def check_lists(args: argparse.Namespace, known_tasks: list[str]) -> tuple[list[str], list[str]]:
    """(protocols, tasks) from the comma lists; a bad entry is a DataError naming the option."""
    protocols = [x.strip() for x in args.protocol.split(",") if x.strip()]
    bad = [x for x in protocols if x not in PROTOCOLS]
    if bad or not protocols:
        raise DataError(f"--protocol={args.protocol!r}: allowed values are {', '.join(PROTOCOLS)}")
    spec = args.tasks if args.tasks is not None else DEFAULT_TASKS[args.source]
    tasks = [x.strip() for x in spec.split(",") if x.strip()] or known_tasks[:3]
    unknown = [t for t in tasks if t not in known_tasks]
    if unknown:
        raise DataError(
            f"--tasks: {', '.join(map(repr, unknown))} not in {args.source}; "
            f"known: {', '.join(known_tasks)}"
        )
    if len(set(tasks)) < 2:
        raise DataError(f"--tasks needs >= 2 different tasks, got {spec!r}")
    return protocols, tasks


def task_of(example: Any, source: str) -> str:
    """Dolly rows are grouped by category, NI rows by task name."""
    return example.group if source == "natural_instructions" else example.category


def task_batches(
    by_task: dict[str, list], runs: list[tuple[str, int]], tokenizer: Any, args: argparse.Namespace
) -> dict[str, np.ndarray]:
    """[runs, steps, batch, seq] int32; run (task, seed) draws its rows with rng(seed), so
    step s of every task uses the same draw and the control differs only in the draw."""
    out: dict[str, list[np.ndarray]] = {"tokens": [], "loss_mask": [], "attn_mask": []}
    for task, seed in runs:
        ts, _ = tokenize_examples(by_task[task], tokenizer, max_seq_len=args.max_seq_len)
        if len(ts) == 0:
            raise DataError(f"--max-seq-len={args.max_seq_len}: no {task!r} row fits; raise it")
        need = args.steps * args.batch_size
        rng = np.random.default_rng(seed)
        idx = rng.choice(len(ts), need, replace=len(ts) < need).reshape(args.steps, -1)
        out["tokens"].append(ts.tokens[idx])
        out["loss_mask"].append(ts.loss_mask()[idx])
        out["attn_mask"].append(ts.attn_mask()[idx])
    return {k: np.stack(v).astype(np.int32) for k, v in out.items()}


def train_runs(
    resolved: Any, batches: dict[str, np.ndarray], protocol: str, args: argparse.Namespace
) -> tuple[list[dict], np.ndarray]:
    """One adapter of kind ``protocol`` per run, all from the same init (runs vmapped, one
    jitted step at a time so every step's loss is kept). Returns (trees, losses [runs, steps])."""
    adapter = AdapterConfig(
        kind=protocol,
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
    n = batches["tokens"].shape[0]
    init = init_adapters(jax.random.PRNGKey(args.seed), resolved.cfg, adapter)
    params = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), init)
    labels = lambda p: jax.tree.map(lambda _: "shared", p)  # noqa: E731  (every factor trains)
    tx = make_optimizer(training, labels, args.steps)
    loss_fn = make_loss_fn(training)
    key = jax.random.PRNGKey(args.seed)  # dropout is 0: unused

    @jax.jit
    def step(base: Any, params: Any, opt_state: Any, batch: dict) -> tuple[Any, Any, jax.Array]:
        def one(p: Any, s: Any, b: dict) -> tuple[Any, Any, jax.Array]:
            p, s, metrics = local_train(loss_fn, base, p, tx, s, b, key, labels)
            return p, s, metrics["loss"]

        return jax.vmap(one)(params, opt_state, batch)

    opt_state = jax.vmap(tx.init)(params)
    losses, start = [], time.perf_counter()
    for s in range(args.steps):
        batch = {k: v[:, s : s + 1] for k, v in batches.items()}
        params, opt_state, loss = step(resolved.base, params, opt_state, batch)
        losses.append(np.asarray(loss, np.float64))
        if (s + 1) % 10 == 0 or s + 1 == args.steps:
            print(
                f"  {protocol} step {s + 1}/{args.steps}: loss {np.round(losses[-1], 3)} "
                f"({time.perf_counter() - start:.0f} s, load {os.getloadavg()[0]:.2f})",
                flush=True,
            )
    trees = [jax.tree.map(lambda x, i=i: np.asarray(x[i], np.float32), params) for i in range(n)]
    return trees, np.stack(losses, axis=1)


def score(trees: list[dict], n_tasks: int, protocol: str, axis: str) -> dict[str, Any]:
    """Between-task rows and summary over the first ``n_tasks`` trees, and the within-task
    control (tree 0 vs the last tree) when there is one."""
    leaves = [protocol_leaves(t, protocol, axis) for t in trees]
    rows, summary = tree_sensitivity(leaves[:n_tasks], axis)
    out = {"rows": rows, "summary": summary, "verdict": verdict(summary)}
    if len(leaves) > n_tasks:
        out["control"] = tree_sensitivity([leaves[0], leaves[-1]], axis)[1]
    return out


def scorings(protocol: str, args: argparse.Namespace) -> list[str]:
    """LoRA is split after training, so both axes cost nothing; decomposed trains one."""
    return ["row", "col"] if protocol == "lora" else [args.norm_axis]


def summary_entry(result: dict, meta: dict) -> dict[str, Any]:
    s = result["summary"]
    return {
        "dir_A_over_dir_B": s["dir_A/dir_B"],
        "mag_B_over_mag_A_abs": s["mag_B/mag_A"],
        "mag_B_over_mag_A_rel": s["rel_mag_B/rel_mag_A"],
        "steps": meta["steps"],
        "verdict": result["verdict"],
        "paper": {
            "dir_A_over_dir_B": PAPER_RATIOS["dir_A/dir_B"],
            "mag_B_over_mag_A": PAPER_RATIOS["mag_B/mag_A"],
        },
        "model": meta["model"],
        "tasks": meta["tasks"],
        "lr": meta["lr"],
        "within_task_control": (
            {k: result["control"][k] for k in RATIOS} if "control" in result else None
        ),
    }


def fmt(x: float) -> str:
    return f"{x:.3g}" if 1e-2 <= abs(x) < 1e4 or x == 0 else f"{x:.2e}"


def markdown(results: dict[str, dict], meta: dict) -> str:
    head = (
        "| protocol | loss first → last 10 | 1−cos A | 1−cos B | **dir A/B** | abs ΔA_M | abs ΔB_M "
        "| **mag B/A abs** | rel ΔA_M | rel ΔB_M | **mag B/A rel** |"
    )

    def line(name: str, loss: str, s: dict) -> str:
        vals = [s[k] for k in ("dir_A", "dir_B", "dir_A/dir_B", "mag_A", "mag_B", "mag_B/mag_A",
                               "rel_mag_A", "rel_mag_B", "rel_mag_B/rel_mag_A")]  # fmt: skip
        return f"| {name} | {loss} | " + " | ".join(fmt(v) for v in vals) + " |"

    table, control, by_name, verdicts = [], [], [], []
    for key, res in results.items():
        curve = np.asarray(meta["losses"][res["protocol"]])[: meta["n_tasks"]]
        loss = f"{curve[:, 0].mean():.3f} → {curve[:, -SMOOTH:].mean():.3f}"
        table.append(line(key, loss, res["summary"]))
        if "control" in res:
            control.append(line(f"{key} (within {meta['tasks'][0]})", "", res["control"]))
        for name in sorted({r["name"] for r in res["rows"]}):
            rows = [r for r in res["rows"] if r["name"] == name]
            mean = {k: float(np.mean([r[k] for r in rows])) for k in METRICS}
            by_name.append(line(f"{key} {name}", "", {**mean, **ratios(mean)}))
        verdicts.append(f"- **{key}**: {res['verdict']}.")
    sep = "| --- " * 11 + "|"
    paper = f"| paper (LLaMA2-7B, Dolly) | | | | **{PAPER_RATIOS['dir_A/dir_B']}** | | | " + (
        f"**{PAPER_RATIOS['mag_B/mag_A']:g}** | | | |"
    )
    return "\n".join(
        [
            f"# Sensitivity of LoRA magnitudes and directions across tasks ({meta['model']})",
            "",
            f"Tasks ({meta['source']}): {', '.join(meta['tasks'])}; {meta['steps']} steps × batch "
            f"{meta['batch_size']} × seq {meta['max_seq_len']}, AdamW lr {meta['lr']} (constant, "
            f"clip 1), r {meta['r']}, α {meta['alpha']}, targets {meta['targets']}, seed "
            f"{meta['seed']}; one adapter per task from one shared init. Between-task values are "
            "means over modules of the mean over task pairs; ratios are of those means.",
            "",
            head,
            sep,
            *table,
            paper,
            "",
            "Within-task control (the first task trained twice on two draws of its rows): the "
            "floor a between-task difference has to clear.",
            "",
            head,
            sep,
            *(control or ["| (no control run) |" + " |" * 10]),
            "",
            "By module name (mean over layers):",
            "",
            head,
            sep,
            *by_name,
            "",
            "Verdicts (a ratio reproduces the paper's when > 1 and within a factor 2 of it):",
            "",
            *verdicts,
            "",
            "Compute: "
            + "; ".join(f"{p} {s:.0f} s" for p, s in meta["seconds"].items())
            + f"; load average {meta['load_start']} at start, {meta['load_end']} at end.",
            "",
        ]
    )


def plot(out: pathlib.Path, results: dict[str, dict], meta: dict) -> None:
    """sensitivity.png: per layer, A vs B for each metric and scoring; loss_curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = (("dir", "direction change 1 − cos"), ("mag", "|ΔM|"), ("rel_mag", "relative |ΔM|"))
    fig, axes = plt.subplots(len(results), 3, figsize=(13, 3.2 * len(results)), squeeze=False)
    for row_axes, (key, res) in zip(axes, results.items(), strict=True):
        layers = sorted({r["layer"] for r in res["rows"]})
        for ax, (metric, title) in zip(row_axes, cols, strict=True):
            for x, marker in (("A", "o-"), ("B", "s-")):
                k = f"{metric}_{x}"
                per_layer = [
                    np.mean([r[k] for r in res["rows"] if r["layer"] == i]) for i in layers
                ]
                ax.plot(layers, per_layer, marker, ms=3, label=x)
            ax.set_title(f"{key}: {title}", fontsize=9)
            ax.set_yscale("log")
            ax.set_xlabel("layer")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sensitivity.png", dpi=110)
    plt.close(fig)

    names = [*meta["tasks"], f"{meta['tasks'][0]} (control)"]
    fig, axes = plt.subplots(1, len(meta["losses"]), figsize=(6 * len(meta["losses"]), 3.5))
    for ax, (protocol, curves) in zip(np.atleast_1d(axes), meta["losses"].items(), strict=True):
        for name, curve in zip(names, np.asarray(curves), strict=False):
            (h,) = ax.plot(np.arange(1, len(curve) + 1), curve, alpha=0.25)
            if len(curve) >= SMOOTH:
                smooth = np.convolve(curve, np.ones(SMOOTH) / SMOOTH, mode="valid")
                ax.plot(np.arange(SMOOTH, len(curve) + 1), smooth, color=h.get_color(), label=name)
            else:
                h.set_label(name)
        ax.set_title(f"{protocol}: training loss (raw, and {SMOOTH}-step mean)", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)


def write_outputs(out: pathlib.Path, summary_path: pathlib.Path, results: dict, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "sensitivity.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["protocol", "module", "layer", "name", *METRICS])
        writer.writeheader()
        for key, res in results.items():
            writer.writerows({"protocol": key, **r} for r in res["rows"])
    (out / "sensitivity.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (out / "sensitivity.md").write_text(markdown(results, meta))
    plot(out, results, meta)
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary = {key: summary_entry(res, meta) for key, res in results.items()}
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = [round(x, 2) for x in os.getloadavg()]
    try:
        examples = SOURCES[args.source](verbose=False).examples
        by_task: dict[str, list] = {}
        for e in examples:
            by_task.setdefault(task_of(e, args.source), []).append(e)
        protocols, tasks = check_lists(args, list(by_task))
        resolved = resolve_model(args.model, dtype=jnp.dtype(args.dtype))
        runs = [(t, args.seed) for t in tasks] + (
            [(tasks[0], args.seed + 1)] if args.control else []
        )
        batches = task_batches(by_task, runs, resolved.tokenizer, args)
        results, losses, seconds = {}, {}, {}
        for protocol in protocols:
            start = time.perf_counter()
            trees, curves = train_runs(resolved, batches, protocol, args)
            seconds[protocol] = round(time.perf_counter() - start, 1)
            losses[protocol] = curves.round(5).tolist()
            for axis in scorings(protocol, args):
                results[f"{protocol}_{axis}"] = {
                    "protocol": protocol,
                    "norm_axis": axis,
                    **score(trees, len(tasks), protocol, axis),
                }
    except (DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = {
        **{k: v for k, v in vars(args).items() if k not in ("out", "summary", "tasks")},
        "tasks": tasks,
        "n_tasks": len(tasks),
        "model_source": resolved.source,
        "losses": losses,
        "seconds": seconds,
        "load_start": load_start,
        "load_end": [round(x, 2) for x in os.getloadavg()],
        "command": " ".join(["python", "scripts/sensitivity.py", *(argv or sys.argv[1:])]),
    }
    out = pathlib.Path(args.out)
    write_outputs(
        out, pathlib.Path(args.summary or out / "sensitivity_summary.json"), results, meta
    )
    for key, res in results.items():
        s = res["summary"]
        print(
            f"{key}: dir_A/dir_B {fmt(s['dir_A/dir_B'])} (paper 1.7), mag_B/mag_A abs "
            f"{fmt(s['mag_B/mag_A'])} rel {fmt(s['rel_mag_B/rel_mag_A'])} (paper 41): "
            f"{res['verdict']}"
        )
    print(f"{seconds} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
