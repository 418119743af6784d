"""Per-round metrics: one JSON line per round in ``metrics.jsonl``, TensorBoard scalars, and a
printed summary line under a tqdm bar over rounds.

Metrics are flat dicts such as
``{"train/loss": 2.31, "global/rouge_l": 0.21, "personal/rouge_l/mean": ...}`` (``flatten``
turns the nested eval report into that form) so every sink treats them alike. A non-finite
number is written as ``null`` (``metrics.jsonl`` stays strict JSON) and left out of TensorBoard;
list values (``phase/<phase>/excluded``: client ids) go to the JSON line only.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import tqdm
from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested dict -> ``{"a/b/c": number}``, keeping only int/float leaves (None dropped)."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, name))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value) if isinstance(value, float) else value
    return out


def json_safe(tree: Any) -> Any:
    """``tree`` with every non-finite float (NaN, ±inf) replaced by None, so that
    ``json.dumps(..., allow_nan=False)`` writes it as strict JSON (``null``)."""
    if isinstance(tree, Mapping):
        return {k: json_safe(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [json_safe(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


def excluded_clients(metrics: Mapping[str, Any]) -> dict[str, list[int]]:
    """{phase: client ids excluded for non-finite values} for the phases that excluded any."""
    suffix = "/excluded"
    return {
        k.removeprefix("phase/")[: -len(suffix)]: list(v)
        for k, v in metrics.items()
        if k.endswith(suffix) and v
    }


def no_valid_client(metrics: Mapping[str, Any]) -> list[str]:
    """The phases in which every sampled client (``clients``) was excluded."""
    sampled = set(metrics.get("clients") or ())
    return [p for p, ids in excluded_clients(metrics).items() if sampled and sampled <= set(ids)]


def read_metrics(run_dir: str | pathlib.Path) -> list[dict[str, Any]]:
    """Rows of a run's ``metrics.jsonl`` (each has ``round`` plus flat metrics)."""
    path = pathlib.Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rewrite_metrics(run_dir: str | pathlib.Path, history: Sequence[Mapping[str, Any]]) -> None:
    """Write ``metrics.jsonl`` anew from a checkpoint's metric history (``history[i]`` is round
    i + 1): on resume, this repairs a last line torn by a kill mid-write. Process 0 only."""
    if jax.process_index():
        return
    rows = ({"round": i, **row} for i, row in enumerate(history, 1))
    (pathlib.Path(run_dir) / METRICS_FILE).write_text("".join(map(_json_line, rows)))


def _json_line(row: Mapping[str, Any]) -> str:
    return json.dumps(json_safe(row), allow_nan=False) + "\n"


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def _pick(metrics: Mapping[str, Any], *names: str) -> list[tuple[str, float]]:
    return [(n, metrics[n]) for n in names if _is_number(metrics.get(n))]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def round_line(round_: int, rounds: int, metrics: Mapping[str, float]) -> str:
    """The one printed line per round: train loss, global and personal metrics, bytes up/down."""
    parts = [f"round {round_}/{rounds}"]
    train = _pick(metrics, "train/loss")
    if train:
        parts.append(f"train loss {train[0][1]:.4f}")
    glob = _pick(metrics, "global/rouge_l", "global/loss")
    if glob:
        label = metrics.get("global/label", "global")
        parts.append(label + " " + " ".join(f"{n.split('/')[-1]} {v:.4f}" for n, v in glob))
    loc = _pick(metrics, "personal/rouge_l/mean", "personal/rouge_l/worst", "personal/loss/mean")
    if loc:
        stats = (f"{n.split('/', 1)[1].replace('/', ' ')} {v:.4f}" for n, v in loc)
        parts.append("personal " + " ".join(stats))
    comm = dict(_pick(metrics, "comm/up_bytes", "comm/down_bytes"))
    if comm:
        parts.append(
            f"up {_mb(comm.get('comm/up_bytes', 0))} down {_mb(comm.get('comm/down_bytes', 0))}"
        )
    if "time/round_s" in metrics:
        parts.append(f"{metrics['time/round_s']:.1f} s")
    for phase, ids in excluded_clients(metrics).items():
        parts.append(f"{phase}: clients {ids} excluded (non-finite)")
    return " | ".join(parts)


class MetricsLogger:
    """Writes each round's metrics to JSONL, TensorBoard and the console.

    ``resume_round`` drops rows after that round from an existing ``metrics.jsonl`` (they belong
    to rounds that the resumed run will repeat); otherwise an existing file is replaced.
    In a multi-process run only process 0 writes, prints and shows the bar; the others' logger
    does nothing.
    """

    def __init__(
        self,
        run_dir: str | pathlib.Path,
        *,
        rounds: int,
        resume_round: int | None = None,
        progress: bool = True,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.run_dir = pathlib.Path(run_dir)
        self._primary = jax.process_index() == 0
        if not self._primary:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rounds = rounds
        path = self.run_dir / METRICS_FILE
        last = resume_round or 0
        kept = [r for r in read_metrics(self.run_dir) if r["round"] <= last]
        path.write_text("".join(map(_json_line, kept)))
        self._file = path.open("a")
        self._tb = SummaryWriter(str(self.run_dir / TB_DIR), purge_step=resume_round)
        self._bar = tqdm.tqdm(
            total=rounds, initial=last, desc="rounds", unit="round", disable=not progress
        )
        self._echo = echo or tqdm.tqdm.write

    def log(self, round_: int, metrics: Mapping[str, Any]) -> None:
        if not self._primary:
            return
        self._file.write(_json_line({"round": round_, **metrics}))
        self._file.flush()
        for name, value in metrics.items():
            if _is_number(value):
                self._tb.add_scalar(name, value, round_)
        self._tb.flush()
        self._bar.update(1)
        if _is_number(metrics.get("train/loss")):
            self._bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
        self._echo(round_line(round_, self.rounds, metrics))

    def close(self) -> None:
        if not self._primary:
            return
        self._bar.close()
        self._file.close()
        self._tb.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
