"""Reproduce the seed papers' claims on a grid: methods × seeds × settings (docs/protocol.md).

    python scripts/reproduce.py --grid configs/protocol.py:cpu --out runs/reproduce/cpu \\
        --report docs/reproduction.md

Every cell (setting, method, lr, seed) is a run directory ``OUT/<setting>/<method>/lr<lr>-seed<s>``
trained by ``fedlora_jax.runner`` and scored on the test split (its ``final_eval.json``) and on
the validation split (``cell.json``, written last). A cell with ``cell.json`` is finished and
skipped, so the command resumes cell by cell. The model and data are built once per (setting,
seed); each method reuses them, and compiled rounds are shared by every cell with the same
method and lr. Before any training the budget of every method of a setting is checked
(``fedlora_jax.protocol.check_budgets``). On the first seed each method runs its lr grid and its
lr is the one with the lowest mean personal loss on the validation split; the other seeds run
that lr. The report (``--report``, with ``.json`` raw data and ``_*.png`` plots beside it) gives
mean ± std over seeds, paired differences against the baseline with 95 % t intervals, and one
verdict per claim; it is rewritten from the finished cells at the end of every invocation.

Exit status: 0 done, 2 a mistake in the grid or a config (or budgets that differ).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

CELL_FILE = "cell.json"
METRICS = ("global_loss", "personal_loss", "global_rouge_l", "personal_rouge_l")


@dataclasses.dataclass(frozen=True)
class Claim:
    """A seed-paper claim: ``method`` better than the baseline on ``model`` ("global" or
    "personal"); ``strong_only`` restricts it to the strongly non-IID settings."""

    text: str
    method: str
    model: str
    strong_only: bool = False


CLAIMS = (
    Claim("FedLoRA-Optimizer ≥ FedIT globally", "fedlora_optimizer", "global"),
    Claim("FedLoRA-Optimizer ≥ FedIT personally", "fedlora_optimizer", "personal"),
    Claim("FedALT > FedIT personally", "fedalt", "personal"),
    Claim("FedGaLore > FedIT under strong non-IID", "fedgalore", "global", strong_only=True),
)
SENSITIVITY_CLAIM = "A/B sensitivity asymmetry (A's direction, B's magnitude move most)"


# ----------------------------------------------------------------------------- the grid


def load_grid(spec: str) -> Any:
    """``configs/protocol.py[:preset]`` -> its ``get_grid(preset)``, through the config loader
    (a missing or broken file is one ConfigError line naming it)."""
    from fedlora_jax.config import load_preset

    return load_preset(spec, "get_grid", "--grid")


def cell_name(lr: float, seed: int) -> str:
    return f"lr{lr:g}-seed{seed}"


def cell_config(grid: Any, setting: Any, method: Any, lr: float, seed: int, out: pathlib.Path):
    from fedlora_jax import config as config_lib
    from fedlora_jax.protocol import cell_overrides

    overrides = cell_overrides(grid, setting, method, lr, seed) + [
        f"run.out_dir={out / setting.name / method.name}",
        f"run.name={cell_name(lr, seed)}",
    ]
    return config_lib.load_config(str(REPO / setting.config), overrides)


def check_grid_budgets(grid: Any, out: pathlib.Path) -> dict[str, dict[str, Any]]:
    """Every setting's method budgets (from the configs; no model is loaded), refused with
    one line when they differ. Returns setting -> method -> Budget."""
    from fedlora_jax.protocol import check_budgets, config_budget

    budgets = {}
    for setting in grid.settings:
        per_method = {}
        for method in grid.methods:
            cfg = cell_config(grid, setting, method, method.lrs[0], grid.seeds[0], out)
            per_method[method.name] = config_budget(cfg, cfg.data.num_clients)
        check_budgets({f"{setting.name}/{m}": b for m, b in per_method.items()})
        budgets[setting.name] = per_method
    return budgets


# ----------------------------------------------------------------------------- one cell


def summary(report: Mapping[str, Any] | None) -> dict[str, float | None]:
    """The four compared numbers of an evaluation report (None where the model is absent)."""
    report = report or {}
    glob = (report.get("global") or {}).get("metrics") or {}
    pers = (report.get("personal") or {}).get("summary") or {}
    return {
        "global_loss": glob.get("loss"),
        "personal_loss": (pers.get("loss") or {}).get("mean"),
        "global_rouge_l": glob.get("rouge_l"),
        "personal_rouge_l": (pers.get("rouge_l") or {}).get("mean"),
    }


class Setups:
    """The model and data of the latest (setting, seed), built once; each method's algorithm
    and batches derived from them (``runner.build`` when model or data keys differ)."""

    def __init__(self) -> None:
        self._key: str | None = None
        self._setup: Any = None

    def get(self, cfg: Any) -> tuple[Any, float]:
        """(setup for ``cfg``, seconds spent building the model and data: 0 when reused)."""
        from fedlora_jax import runner

        key = json.dumps({"model": cfg.model.to_dict(), "data": cfg.data.to_dict()}, sort_keys=True)
        built = 0.0
        if key != self._key:
            self._setup = None  # free the previous model first
            start = time.perf_counter()
            self._setup, self._key = runner.build(cfg, verbose=False), key
            built = time.perf_counter() - start
        base = self._setup
        training = runner.client_training(cfg, base.model_cfg)
        algorithm = runner.build_algorithm(cfg, training, len(base.data.clients))
        setup = dataclasses.replace(
            base,
            training=training,
            algorithm=algorithm,
            engine=runner.engine_config(cfg),
            batches=runner.RoundBatches(base.data, algorithm, cfg),
        )
        return setup, built


def run_cell(cfg: Any, setups: Setups, budget: Any) -> dict[str, Any]:
    """Train one cell (resuming a started one), score test and validation, write cell.json."""
    from fedlora_jax import runner
    from fedlora_jax.data.pipeline import validation_view

    run_dir = pathlib.Path(cfg.run.out_dir) / cfg.run.name
    start = time.perf_counter()
    setup, built = setups.get(cfg)
    result = runner.run(
        cfg, resume=(run_dir / "config.json").is_file(), setup=setup, progress=False,
        echo=lambda _: None,
    )  # fmt: skip
    val_cfg = cfg.copy_and_resolve_references()
    val_cfg.eval.max_new_tokens = 1  # the lr is chosen on loss; one token keeps ROUGE cheap
    val_setup = dataclasses.replace(setup, data=validation_view(setup.data))
    val = runner.evaluate_state(val_cfg, val_setup, result.state)
    record = {
        "test": summary(result.final_eval),
        "val": summary(val),
        "global_label": ((result.final_eval or {}).get("global") or {}).get("label"),
        "budget": budget.as_dict(),
        "rounds_done": int(result.state.round),
        "stopped": result.stopped,
        "wall_s": time.perf_counter() - start - built,
        "build_s": built,
        "loadavg_end": list(os.getloadavg()),
    }
    tmp = run_dir / f"{CELL_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(run_dir / CELL_FILE)
    return record


def read_cell(path: pathlib.Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def run_grid(
    grid: Any, out: pathlib.Path, budgets: Mapping, max_cells: int | None, only: Sequence[str]
) -> tuple[int, list[str]]:
    """Run the unfinished cells in order (setting, seed, method, lr); return how many ran and
    the cells that failed (left unfinished, retried by the next invocation). A method whose lr
    sweep did not finish skips its other seeds. ``only`` (method names; empty = all) runs a
    subset, e.g. the cheap methods' seeds before an expensive method's sweep."""
    from fedlora_jax.protocol import choose_lr

    setups, ran, first = Setups(), 0, grid.seeds[0]
    failed: list[str] = []
    for setting in grid.settings:
        chosen: dict[str, float] = {}
        for seed in grid.seeds:
            for method in grid.methods:
                if only and method.name not in only:
                    continue
                if seed != first and method.name not in chosen:
                    print(f"[skip] {setting.name} {method.name} seed={seed}: its lr sweep failed")
                    continue
                lrs = method.lrs if seed == first else (chosen[method.name],)
                for lr in lrs:
                    cfg = cell_config(grid, setting, method, lr, seed, out)
                    cell_dir = pathlib.Path(cfg.run.out_dir) / cfg.run.name
                    where = f"{setting.name} {method.name} lr={lr:g} seed={seed}"
                    if (cell_dir / CELL_FILE).is_file():
                        print(f"[skip] {where}: finished")
                        continue
                    if max_cells is not None and ran >= max_cells:
                        return ran, failed
                    try:
                        rec = run_cell(cfg, setups, budgets[setting.name][method.name])
                    except Exception as e:  # e.g. out of memory: the cell stays unfinished
                        failed.append(where)
                        print(f"[fail] {where}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                        continue
                    ran += 1
                    print(
                        f"[cell] {where}: val personal loss {_num(rec['val']['personal_loss'])}, "
                        f"test personal loss {_num(rec['test']['personal_loss'])} "
                        f"({rec['wall_s']:.0f} s + build {rec['build_s']:.0f} s, load "
                        f"{rec['loadavg_end'][0]:.1f})",
                        flush=True,
                    )
                if seed == first and not any(
                    f.startswith(f"{setting.name} {method.name} ") for f in failed
                ):
                    scores = {
                        lr: _val_score(out / setting.name / method.name / cell_name(lr, seed))
                        for lr in method.lrs
                    }
                    chosen[method.name] = choose_lr(scores)
    return ran, failed


def _val_score(cell_dir: pathlib.Path) -> float:
    cell = read_cell(cell_dir / CELL_FILE)
    value = cell["val"]["personal_loss"] if cell else None
    return math.nan if value is None else float(value)


# ----------------------------------------------------------------------------- the report


def collect(grid: Any, out: pathlib.Path) -> dict[str, Any]:
    """Every finished cell, the lr chosen per (setting, method) and each setting's per-seed
    results at that lr: setting -> method -> {"lr", "val_scores", "seeds": {seed: cell}}."""
    from fedlora_jax.protocol import choose_lr

    results: dict[str, Any] = {}
    for setting in grid.settings:
        per_method = {}
        for method in grid.methods:
            root = out / setting.name / method.name
            sweep = {lr: _val_score(root / cell_name(lr, grid.seeds[0])) for lr in method.lrs}
            try:
                lr = choose_lr(sweep)
            except ValueError:
                lr = None  # the sweep has not finished (or diverged at every lr)
            seeds = {}
            if lr is not None and all(
                (root / cell_name(x, grid.seeds[0]) / CELL_FILE).is_file() for x in method.lrs
            ):
                for seed in grid.seeds:
                    cell = read_cell(root / cell_name(lr, seed) / CELL_FILE)
                    if cell is not None:
                        seeds[seed] = cell
            per_method[method.name] = {"lr": lr, "val_scores": sweep, "seeds": seeds}
        results[setting.name] = per_method
    return results


def method_stats(results: Mapping[str, Any], grid: Any) -> dict[str, Any]:
    """setting -> method -> metric -> {mean, std, n}; and paired differences against the
    baseline on the seeds both finished: setting -> method -> metric -> PairedCI dict."""
    from fedlora_jax.analysis.stats import mean_std, paired_ci

    stats: dict[str, Any] = {}
    diffs: dict[str, Any] = {}
    for setting, per_method in results.items():
        stats[setting], diffs[setting] = {}, {}
        base = per_method[grid.baseline]["seeds"]
        for name, res in per_method.items():
            stats[setting][name] = {}
            for metric in METRICS:
                vals = [c["test"][metric] for c in res["seeds"].values()]
                vals = [v for v in vals if v is not None]
                mean, std = mean_std(vals)
                stats[setting][name][metric] = {"mean": mean, "std": std, "n": len(vals)}
            if name == grid.baseline:
                continue
            diffs[setting][name] = {}
            for metric in METRICS:
                common = [
                    s for s in grid.seeds
                    if s in res["seeds"] and s in base
                    and res["seeds"][s]["test"][metric] is not None
                    and base[s]["test"][metric] is not None
                ]  # fmt: skip
                if not common:
                    continue
                ci = paired_ci(
                    [res["seeds"][s]["test"][metric] for s in common],
                    [base[s]["test"][metric] for s in common],
                )
                diffs[setting][name][metric] = dataclasses.asdict(ci)
    return {"stats": stats, "diffs": diffs}


def claim_rows(grid: Any, diffs: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per claim: per applicable setting the loss (primary) and ROUGE-L (secondary)
    difference against the baseline and its verdict; the overall verdict is "supported" when
    every setting supports it, "not supported" when every setting contradicts it, else
    "inconclusive"."""
    from fedlora_jax.analysis.stats import PairedCI, verdict

    rows = []
    for claim in CLAIMS:
        per_setting = {}
        for setting in grid.settings:
            if claim.strong_only and not setting.strong_non_iid:
                continue
            entry = {}
            for metric, better in (("loss", "lower"), ("rouge_l", "higher")):
                raw = (
                    diffs.get(setting.name, {}).get(claim.method, {}).get(f"{claim.model}_{metric}")
                )
                if raw is None:
                    continue
                entry[metric] = {**raw, "verdict": verdict(PairedCI(**raw), better)}
            per_setting[setting.name] = entry
        verdicts = [e["loss"]["verdict"] for e in per_setting.values() if "loss" in e]
        if verdicts and len(verdicts) == len(per_setting) and set(verdicts) == {"supported"}:
            overall = "supported"
        elif verdicts and len(verdicts) == len(per_setting) and set(verdicts) == {"not supported"}:
            overall = "not supported"
        else:
            overall = "inconclusive"
        rows.append({"claim": claim.text, "settings": per_setting, "verdict": overall})
    return rows


def _num(x: float | None, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci_text(d: Mapping[str, Any]) -> str:
    return f"{d['mean']:+.4f} [{_num(d['lo'])}, {_num(d['hi'])}] (n={d['n']})"


def render(
    grid: Any, results: Mapping, analysed: Mapping, claims: Sequence, meta: Mapping[str, Any]
) -> str:
    """docs/reproduction.md's text."""
    lines = [
        f"# Reproduction: grid `{grid.name}` ({grid.description})",
        "",
        meta["preamble"],
        "",
        *([grid.notes, ""] if grid.notes else []),
        "## Claims",
        "",
        "Paired difference method − FedIT over seeds, 95 % paired-t interval, per setting. "
        "Primary: response-token loss on the test split (lower is better); secondary: ROUGE-L "
        "on the same rows (higher is better). A claim is *supported* in a setting when the "
        "primary interval excludes 0 on the claimed side, *not supported* when it excludes 0 "
        "on the other side, *inconclusive* otherwise; overall *supported* / *not supported* "
        "only when every setting agrees.",
        "",
        "| claim | setting | Δ loss [95 % CI] | loss verdict | Δ ROUGE-L [95 % CI] | "
        "ROUGE-L verdict | overall |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in claims:
        if not row["settings"]:
            lines.append(f"| {row['claim']} | – | no setting of this grid tests it | | | | |")
        for i, (setting, entry) in enumerate(row["settings"].items()):
            loss, rouge = entry.get("loss"), entry.get("rouge_l")
            lines.append(
                f"| {row['claim'] if i == 0 else ''} | {setting} | "
                f"{_ci_text(loss) if loss else 'not run'} | {loss['verdict'] if loss else ''} | "
                f"{_ci_text(rouge) if rouge else 'not run'} | "
                f"{rouge['verdict'] if rouge else ''} | {row['verdict'] if i == 0 else ''} |"
            )
    lines += [
        f"| {SENSITIVITY_CLAIM} | – | – | – | – | – | see the sensitivity study "
        "(docs/fedlora_optimizer.md) |",
        "",
        "## Results per setting (test split, mean ± std over seeds at the chosen lr)",
        "",
    ]
    by_name = {s.name: s for s in grid.settings}
    for setting, per_method in results.items():
        lines += [
            f"### {setting}: {by_name[setting].description}",
            "",
            "| method | lr (validation sweep: personal loss) | seeds | global loss | "
            "personal loss | global ROUGE-L | personal ROUGE-L | budget per round |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, res in per_method.items():
            st = analysed["stats"][setting][name]
            sweep = ", ".join(f"{lr:g}: {_num(s)}" for lr, s in res["val_scores"].items())
            cells = [
                f"{_num(st[m]['mean'])} ± {_num(st[m]['std'])}" if st[m]["n"] else "–"
                for m in METRICS
            ]
            budget = next(iter(res["seeds"].values()), {}).get("budget", {}).get("text", "")
            lr = "–" if res["lr"] is None else f"{res['lr']:g}"
            lines.append(
                f"| {name} | {lr} ({sweep}) | {len(res['seeds'])} | {' | '.join(cells)} | "
                f"{budget} |"
            )
        lines += ["", "Paired differences against FedIT (method − FedIT, 95 % CI):", ""]
        lines += ["| method | " + " | ".join(f"Δ {m}" for m in METRICS) + " |",
                  "|---" * (len(METRICS) + 1) + "|"]  # fmt: skip
        for name, per_metric in analysed["diffs"][setting].items():
            lines.append(
                f"| {name} | "
                + " | ".join(_ci_text(per_metric[m]) if m in per_metric else "–" for m in METRICS)
                + " |"
            )
        lines.append("")
    lines += [
        f"![test loss per method]({meta['stem']}_loss.png)",
        "",
        f"![paired differences]({meta['stem']}_diffs.png)",
        "",
        "## Compute",
        "",
        meta["compute"],
        "",
    ]
    return "\n".join(lines)


def plot(results: Mapping, analysed: Mapping, grid: Any, stem: pathlib.Path) -> None:
    """``<stem>_loss.png`` (mean ± std test loss per method and setting) and ``<stem>_diffs.png``
    (paired differences against the baseline with their 95 % intervals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(results)
    names = [m.name for m in grid.methods]
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.4), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        for j, metric in enumerate(("global_loss", "personal_loss")):
            st = analysed["stats"][setting]
            means = [st[n][metric]["mean"] for n in names]
            stds = [
                0.0 if math.isnan(st[n][metric]["std"]) else st[n][metric]["std"] for n in names
            ]
            xs = [i + (j - 0.5) * 0.38 for i in range(len(names))]
            ax.bar(xs, means, 0.38, yerr=stds, capsize=3, label=metric.replace("_", " "))
        ax.set_xticks(range(len(names)), names, rotation=25, fontsize=7)
        ax.set_title(setting, fontsize=9)
        lows = [st[n][m]["mean"] for n in names for m in ("global_loss", "personal_loss")]
        finite = [v for v in lows if not math.isnan(v)]
        if finite:
            ax.set_ylim(min(finite) - 0.05, max(finite) + 0.05)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{stem}_loss.png", dpi=100)
    plt.close(fig)

    rows = [
        (f"{s} {n} {m.split('_')[0]}", d)
        for s in settings for n, per in analysed["diffs"][s].items()
        for m, d in per.items() if m.endswith("loss")
    ]  # fmt: skip
    fig, ax = plt.subplots(figsize=(6.5, 0.32 * max(len(rows), 3) + 1))
    for i, (_, d) in enumerate(rows):
        lo, hi = d["lo"], d["hi"]
        if not (math.isnan(lo) or math.isnan(hi)):
            ax.plot([lo, hi], [i, i], color="C0")
        ax.plot([d["mean"]], [i], "o", color="C0")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
    ax.set_xlabel("test loss: method − FedIT (95 % paired-t CI); < 0 = method better")
    fig.tight_layout()
    fig.savefig(f"{stem}_diffs.png", dpi=100)
    plt.close(fig)


def write_report(
    grid: Any, spec: str, out: pathlib.Path, report: pathlib.Path, budgets: Mapping
) -> None:
    """Rewrite the report, its raw JSON and plots from the finished cells under ``out``."""
    results = collect(grid, out)
    analysed = method_stats(results, grid)
    claims = claim_rows(grid, analysed["diffs"])
    cells = sorted(out.glob(f"*/*/*/{CELL_FILE}"))
    records = [read_cell(p) for p in cells]
    wall = sum(r["wall_s"] + r["build_s"] for r in records)
    loads = [r["loadavg_end"][0] for r in records]
    expected = sum(len(m.lrs) + len(grid.seeds) - 1 for m in grid.methods) * len(grid.settings)
    budget_text = "; ".join(f"{s}: {next(iter(b.values())).describe()}" for s, b in budgets.items())
    preamble = (
        f"Generated by `python scripts/reproduce.py --grid {_relative(spec)}` on "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC from {len(records)} of "
        f"{expected} cells. Seeds {', '.join(map(str, grid.seeds))} (run and data seed: init, "
        f"partition, validation carve-out and batch order). Budget, equal for every method of a "
        f"setting (checked): {budget_text}. Learning rates per method: "
        + ", ".join(f"{m.name} {{{', '.join(f'{lr:g}' for lr in m.lrs)}}}" for m in grid.methods)
        + f", chosen on seed {grid.seeds[0]}'s validation split (lowest mean personal loss). "
        f"Common settings: `{' '.join(grid.common)}`."
    )
    compute = (
        f"{len(records)} cells, {wall / 60:.1f} min of wall time in all (training, evaluation, "
        f"model and data builds; compilation included); 1-minute load average at the end of "
        f"each cell: min {min(loads, default=math.nan):.1f}, mean "
        f"{sum(loads) / max(len(loads), 1):.1f}, max {max(loads, default=math.nan):.1f}."
    )
    meta = {"preamble": preamble, "compute": compute, "stem": report.stem}
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(render(grid, results, analysed, claims, meta))
    raw = {
        "grid": dataclasses.asdict(grid),
        "cells": {str(p.parent.relative_to(out)): r for p, r in zip(cells, records, strict=True)},
        "results": {s: {n: {k: v for k, v in r.items()} for n, r in pm.items()}
                    for s, pm in results.items()},
        "analysis": analysed,
        "claims": claims,
        "compute": {"cells": len(records), "wall_s": wall, "loadavg_1min_end_of_cell": loads},
    }  # fmt: skip
    report.with_suffix(".json").write_text(json.dumps(_clean(raw), indent=1, allow_nan=False))
    plot(results, analysed, grid, report.with_suffix(""))


def _clean(x: Any) -> Any:
    """``x`` with NaN floats as None (strict JSON) and every key a string."""
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def _relative(spec: str) -> str:
    path, _, preset = spec.partition(":")
    p = pathlib.Path(path).resolve()
    shown = p.relative_to(REPO) if p.is_relative_to(REPO) else p
    return f"{shown}:{preset}" if preset else str(shown)


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grid", default=str(REPO / "configs" / "protocol.py") + ":cpu")
    parser.add_argument("--out", required=True, help="the grid's run directories")
    parser.add_argument("--report", required=True, help="markdown file (+ .json, _*.png)")
    parser.add_argument("--max_cells", type=int, help="run at most this many unfinished cells")
    parser.add_argument("--report_only", action="store_true", help="only rewrite the report")
    parser.add_argument("--methods", default="", help="run only these methods (comma-separated)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out, failed = pathlib.Path(args.out), []
    try:
        grid = load_grid(args.grid)
        budgets = check_grid_budgets(grid, out)
        if not args.report_only:
            only = [m for m in args.methods.split(",") if m]
            unknown = sorted(set(only) - {m.name for m in grid.methods})
            if unknown:
                raise ValueError(f"--methods: {', '.join(unknown)} not in the grid")
            ran, failed = run_grid(grid, out, budgets, args.max_cells, only)
            print(
                f"ran {ran} cells"
                + (f"; failed (unfinished): {'; '.join(failed)}" if failed else "")
            )
        write_report(grid, args.grid, out, pathlib.Path(args.report), budgets)
    except (ValueError, FileNotFoundError) as e:  # BudgetMismatch, ConfigError, DataError, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {args.report}")
    return 1 if not args.report_only and failed else 0


if __name__ == "__main__":
    sys.exit(main())
