"""Human-readable results of a run directory and comparisons across runs.

``write_results`` turns a run's per-round metrics (``metrics.jsonl``) and its final evaluation
report (``final_eval.json``) into ``results.md`` and ``metrics.png``, with the rows the data
pipeline dropped and the clients excluded for non-finite values in each round. ``compare``
groups several run directories by a config key (e.g. algorithm.name), takes mean ± std over the
runs of a group (e.g. seeds) and writes a table and a plot.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from fedlora_jax.eval.report import render_markdown  # noqa: E402
from fedlora_jax.logging import (  # noqa: E402
    excluded_clients,
    flatten,
    no_valid_client,
    read_metrics,
)

RESULTS_FILE = "results.md"
PLOT_FILE = "metrics.png"
FINAL_EVAL_FILE = "final_eval.json"
CONFIG_FILE = "config.json"

# Columns of the per-round table and panels of the plot: (metric key, label).
ROUND_COLUMNS: tuple[tuple[str, str], ...] = (
    ("train/loss", "train loss"),
    ("global/rouge_l", "global ROUGE-L"),
    ("global/loss", "global loss"),
    ("personal/rouge_l/mean", "personal ROUGE-L mean"),
    ("personal/rouge_l/worst", "personal ROUGE-L worst"),
    ("personal/loss/mean", "personal loss mean"),
    ("gain/loss/mean", "loss gain mean (personal − global)"),
    ("comm/up_bytes_per_client", "up bytes/client"),
    ("comm/down_bytes_per_client", "down bytes/client"),
    ("time/round_s", "round s"),
    ("dp/epsilon", "DP ε"),
    ("dp/clip_fraction", "clip fraction"),
    ("dp/clip", "clip norm C"),
)
PLOTTED = (
    "train/loss", "global/rouge_l", "personal/rouge_l/mean", "global/loss", "personal/loss/mean",
)  # fmt: skip
# Final metrics compared across runs (flat keys of the final evaluation report).
COMPARED: tuple[tuple[str, str], ...] = (
    ("global/metrics/rouge_l", "global ROUGE-L"),
    ("global/metrics/loss", "global loss"),
    ("personal/summary/rouge_l/mean", "personal ROUGE-L mean"),
    ("personal/summary/rouge_l/worst", "personal ROUGE-L worst"),
    ("personal/summary/loss/mean", "personal loss mean"),
    ("personal_gain/summary/loss/mean", "loss gain mean"),
    ("personal_gain/summary/loss/share_gain", "share of clients that gain (loss)"),
)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e4 else f"{v:.4f}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]


def _read_json(path: pathlib.Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _excluded_cell(row: Mapping[str, Any]) -> str:
    return "; ".join(
        f"{phase}: {', '.join(map(str, ids))}" for phase, ids in excluded_clients(row).items()
    )


def round_table(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown lines: one row per round, only the columns some round has (a metric that was
    not finite is an empty cell); an ``excluded clients`` column when some round excluded any."""
    glabel = next((r["global/label"] for r in history if "global/label" in r), "global")
    cols = [
        (k, label.replace("global", glabel, 1) if k.startswith("global/") else label)
        for k, label in ROUND_COLUMNS
        if any(k in row for row in history)
    ]
    rows = [[row["round"], *(row.get(k) for k, _ in cols)] for row in history]
    header = ["round", *(label for _, label in cols)]
    if any(excluded_clients(row) for row in history):
        header.append("excluded clients (non-finite)")
        rows = [[*cells, _excluded_cell(row)] for cells, row in zip(rows, history, strict=True)]
    return _table(header, rows)


def excluded_section(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown lines naming the rounds that excluded clients, and warning about rounds in which
    no client was valid (the shared model was not updated); [] when no round excluded any."""
    lines = [
        f"- round {row['round']}: {_excluded_cell(row)}"
        + (" (every sampled client: no valid client)" if no_valid_client(row) else "")
        for row in history
        if excluded_clients(row)
    ]
    if not lines:
        return []
    head = ["## Excluded clients", "", "Clients whose update had non-finite values; the "
            "aggregate of their round left them out.", ""]  # fmt: skip
    failed = [str(row["round"]) for row in history if no_valid_client(row)]
    if failed:
        head += [f"**Warning: round(s) {', '.join(failed)} had no valid client; the model "
                 "was not trained in them.**", ""]  # fmt: skip
    return [*head, *lines, ""]


def data_section(data: Mapping[str, Any] | None) -> list[str]:
    """Markdown lines: the rows the data pipeline dropped, per reason, and duplicates found."""
    if data is None:
        return []
    return ["## Data", "", f"{drop_line(data)}", ""]


def drop_line(data: Mapping[str, Any]) -> str:
    """``rows dropped: too_long=12, missing_field=1 (13 in all); exact duplicate rows found: 0``."""
    counts = data.get("drop_counts") or {}
    dropped = (
        ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        + f" ({sum(counts.values())} in all)"
        if counts
        else "none"
    )
    return f"rows dropped: {dropped}; exact duplicate rows found: {data.get('duplicates', 0)}"


def plot_history(history: Sequence[Mapping[str, Any]], path: pathlib.Path, title: str) -> None:
    """One panel per plotted metric present in ``history``, over rounds (null values skipped)."""
    keys = [k for k in PLOTTED if any(row.get(k) is not None for row in history)]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(3.6 * max(1, len(keys)), 3.2))
    for ax, key in zip(np.atleast_1d(axes), keys, strict=False):
        points = [(row["round"], row[key]) for row in history if row.get(key) is not None]
        ax.plot(*zip(*points, strict=True), marker="o")
        ax.set_title(key)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def budget_text(run_dir: pathlib.Path) -> str:
    """The run's training budget (docs/protocol.md), or why it cannot be counted."""
    from fedlora_jax.protocol import run_dir_budget  # lazy: it builds through the runner

    if not (run_dir / "clients.csv").is_file():
        return "not counted (no clients.csv in the run directory)"
    return run_dir_budget(run_dir).describe()


def write_results(
    run_dir: str | pathlib.Path,
    *,
    data: Mapping[str, Any] | None = None,
    stopped: str | None = None,
) -> pathlib.Path:
    """Write ``results.md`` and ``metrics.png`` from the files in ``run_dir``; return its path.

    ``data`` is the data summary (``drop_counts``, ``duplicates``; default: the one in
    ``final_eval.json``); ``stopped`` is why the run ended before its final evaluation."""
    run_dir = pathlib.Path(run_dir)
    history = read_metrics(run_dir)
    cfg = _read_json(run_dir / CONFIG_FILE) or {}
    final = None if stopped else _read_json(run_dir / FINAL_EVAL_FILE)
    data = data if data is not None else (final or {}).get("data")
    title = run_dir.name
    lines = [f"# Results: {title}", ""]
    if stopped:
        lines += [f"**Stopped: {stopped}**", ""]
    if cfg:
        setting = [
            ("model", cfg["model"]["spec"]),
            ("algorithm", cfg["algorithm"]["name"]),
            ("adapter", f"{cfg['adapter']['kind']} r={cfg['adapter']['r']} "
                        f"alpha={cfg['adapter']['alpha']} targets={cfg['adapter']['targets']}"),
            ("data", f"{cfg['data']['source']} / {cfg['data']['partition']} / "
                     f"{cfg['data']['num_clients']} clients"),
            ("rounds x client steps", f"{cfg['federated']['rounds']} x "
                                     f"{cfg['federated']['local_steps']}"),
            ("seed", cfg["run"]["seed"]),
            ("budget per round", budget_text(run_dir)),
        ]  # fmt: skip
        lines += _table(["setting", "value"], setting) + [""]
    lines += data_section(data)
    lines += excluded_section(history)
    lines += ["## Final evaluation", ""]
    lines += [render_markdown(final) if final else "_no final evaluation_\n"]
    if history:
        plot_history(history, run_dir / PLOT_FILE, title)
        lines += ["## Per round", "", *round_table(history), "", f"![metrics]({PLOT_FILE})", ""]
    path = run_dir / RESULTS_FILE
    path.write_text("\n".join(lines))
    return path


# ----------------------------------------------------------------------------- comparison


def _get(d: Mapping[str, Any], dotted: str) -> Any:
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _final(run_dir: pathlib.Path) -> dict[str, Any]:
    return _read_json(run_dir / FINAL_EVAL_FILE) or {}


def group_of(
    run_dirs: Sequence[str | pathlib.Path], group_by: str
) -> list[tuple[pathlib.Path, str]]:
    """Each run directory with its group: the value of the dotted config key ``group_by``."""
    out = []
    for d in map(pathlib.Path, run_dirs):
        cfg = _read_json(d / CONFIG_FILE)
        if cfg is None:
            raise FileNotFoundError(f"{d}: not a run directory (no {CONFIG_FILE})")
        key = _get(cfg, group_by)
        if key is None:
            raise ValueError(f"--group_by={group_by!r} is not a key of {d / CONFIG_FILE}")
        out.append((d, str(key)))
    return out


def compare(
    run_dirs: Sequence[str | pathlib.Path],
    out_dir: str | pathlib.Path,
    *,
    group_by: str = "algorithm.name",
) -> pathlib.Path:
    """Write ``comparison.md`` and ``comparison.png`` for ``run_dirs`` grouped by ``group_by``.

    Each group's final metrics are reported as mean ± std (ddof=0) over its runs, and its
    per-round curves are averaged over its runs (rounds present in every run of the group).
    """
    out_dir = pathlib.Path(out_dir)
    groups: dict[str, list[pathlib.Path]] = {}
    for d, key in group_of(run_dirs, group_by):
        groups.setdefault(key, []).append(d)

    rows = []
    for name, dirs in groups.items():
        finals = [flatten(_final(d)) for d in dirs]
        labels = {_get(f, "global.label") for f in map(_final, dirs)} - {None, "global"}
        cells: list[Any] = [name + "".join(f" — {lb}" for lb in sorted(labels)), len(dirs)]
        for key, _ in COMPARED:
            vals = np.array([f[key] for f in finals if key in f], dtype=np.float64)
            cells.append(f"{vals.mean():.4f} ± {vals.std():.4f}" if vals.size else "")
        rows.append(cells)
    lines = [f"# Comparison by {group_by}", ""]
    lines += _table([group_by, "runs", *(label for _, label in COMPARED)], rows)
    lines += [
        "",
        "mean ± std (ddof=0) over the runs of each group; a label after a name says what its "
        "global model is when the protocol never produces one (evaluation only). Gain = personal "
        "− global on each client's test rows.",
        "",
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot_groups(groups, out_dir / "comparison.png")
    lines += ["![comparison](comparison.png)", ""]
    path = out_dir / "comparison.md"
    path.write_text("\n".join(lines))
    return path


def _plot_groups(groups: Mapping[str, Sequence[pathlib.Path]], path: pathlib.Path) -> None:
    histories = {n: [read_metrics(d) for d in dirs] for n, dirs in groups.items()}
    keys = [k for k in PLOTTED if any(k in r for hs in histories.values() for h in hs for r in h)]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(3.6 * max(1, len(keys)), 3.2))
    for ax, key in zip(np.atleast_1d(axes), keys, strict=False):
        for name, hs in histories.items():
            per_run = [{r["round"]: r[key] for r in h if r.get(key) is not None} for h in hs]
            rounds = sorted(set.intersection(*(set(p) for p in per_run)))
            if not rounds:
                continue
            vals = np.array([[p[r] for r in rounds] for p in per_run])
            mean, std = vals.mean(0), vals.std(0)
            ax.plot(rounds, mean, marker="o", label=name)
            ax.fill_between(rounds, mean - std, mean + std, alpha=0.2)
        ax.set_title(key)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
