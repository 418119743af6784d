"""Global and personal evaluation reports from per-example scores (pure; no model, no I/O).

*Global*: the global adapter on the union of all clients' test splits, every example weighted
equally (loss: every response token weighted equally).
*Local*: each client's personal adapter on its own test split, summarised over clients as the
plain mean, the data-weighted mean (weights: the clients' test-example counts unless given), the
worst client and the population std (ddof=0) — the spread a user of a random client sees.
*Personalisation gain*: per client, the personal model's score minus the global model's score on
the SAME test rows (the global section scores the union of the splits, so client i's rows of it
are exactly its split), and its spread over clients. Loss is primary; a negative loss gain and a
positive ROUGE-L gain mean the personal model is better.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedlora_jax.eval.metrics import mean_token_loss, perplexity

# Metric name -> True when higher is better (decides which client is "worst").
METRICS: dict[str, bool] = {
    "rouge_l": True,
    "exact_match": True,
    "loss": False,
    "perplexity": False,
}
GAIN_METRICS = ("loss", "rouge_l")  # personalisation gain: loss primary, ROUGE-L secondary


@dataclasses.dataclass(frozen=True)
class ExampleScore:
    """Scores of one test example under one adapter."""

    client_id: int
    category: str
    rouge_l: float
    exact_match: float
    sum_nll: float  # summed NLL over the response tokens
    n_tokens: int  # number of response tokens scored


def summarise(scores: Sequence[ExampleScore]) -> dict[str, float]:
    """Example-weighted ROUGE-L / EM, token-weighted loss and its perplexity, and counts."""
    if not scores:
        raise ValueError("cannot summarise an empty set of scores")
    loss, n_tokens = mean_token_loss((s.sum_nll, s.n_tokens) for s in scores)
    return {
        "rouge_l": float(np.mean([s.rouge_l for s in scores])),
        "exact_match": float(np.mean([s.exact_match for s in scores])),
        "loss": loss,
        "perplexity": perplexity(loss),
        "n_examples": len(scores),
        "n_tokens": n_tokens,
    }


def _by_key(scores: Sequence[ExampleScore], key: str) -> dict[Any, list[ExampleScore]]:
    groups: dict[Any, list[ExampleScore]] = {}
    for s in scores:
        groups.setdefault(getattr(s, key), []).append(s)
    return dict(sorted(groups.items()))


def by_category(scores: Sequence[ExampleScore]) -> dict[str, dict[str, float]]:
    """``summarise`` per category (examples pooled over clients)."""
    return {cat: summarise(group) for cat, group in _by_key(scores, "category").items()}


def across_clients(
    per_client: Mapping[int, Mapping[str, float]], weights: Mapping[int, float]
) -> dict[str, dict[str, float]]:
    """Mean, weighted mean, worst and std (ddof=0) over clients of every metric in ``METRICS``."""
    ids = sorted(per_client)
    w = np.array([weights[i] for i in ids], dtype=np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"client weights must be >= 0 with a positive sum, got {w.tolist()}")
    out: dict[str, dict[str, float]] = {}
    for name, higher_better in METRICS.items():
        v = np.array([per_client[i][name] for i in ids], dtype=np.float64)
        out[name] = {
            "mean": float(v.mean()),
            "weighted_mean": float(np.dot(w, v) / w.sum()),
            "worst": float(v.min() if higher_better else v.max()),
            "std": float(v.std()),
        }
    return out


def personal_gain(
    global_scores: Sequence[ExampleScore],
    personal_scores: Sequence[ExampleScore],
    personal_adapter: str,
) -> dict[str, Any]:
    """Per client ``personal − global`` of each of ``GAIN_METRICS`` on the client's own rows, and
    over clients: mean, std (ddof=0), min, max and ``share_gain`` (the share of clients whose
    personal model is strictly better). When the personal model is the global one
    (``personal_adapter == "global"``) every gain is exactly 0 and nothing is recomputed."""
    mine = _by_key(personal_scores, "client_id")
    if personal_adapter == "global":
        per_client = {cid: dict.fromkeys(GAIN_METRICS, 0.0) for cid in mine}
    else:
        theirs = _by_key(global_scores, "client_id")
        per_client = {}
        for cid, rows in mine.items():
            other = theirs.get(cid, [])
            if len(other) != len(rows):
                raise ValueError(
                    f"personal gain: client {cid} has {len(rows)} personal rows but {len(other)} "
                    "global rows; the gain needs the same rows"
                )
            p, g = summarise(rows), summarise(other)
            per_client[cid] = {n: p[n] - g[n] for n in GAIN_METRICS}
    summary = {}
    for name in GAIN_METRICS:
        v = np.array([per_client[c][name] for c in sorted(per_client)], dtype=np.float64)
        better = v < 0 if not METRICS[name] else v > 0
        summary[name] = {
            "mean": float(v.mean()),
            "std": float(v.std()),
            "min": float(v.min()),
            "max": float(v.max()),
            "share_gain": float(better.mean()),
        }
    return {
        "definition": "personal − global on each client's test rows (loss: < 0 = personal better)",
        "personal_is_global": personal_adapter == "global",
        "summary": summary,
        "per_client": per_client,
    }


def build_report(
    global_scores: Sequence[ExampleScore] | None,
    personal_scores: Sequence[ExampleScore] | None,
    *,
    personal_adapter: str = "personal",
    client_weights: Mapping[int, float] | None = None,
    global_label: str = "global",
) -> dict[str, Any]:
    """The report as a plain (JSON-ready) dict with sections ``global``, ``personal`` and
    ``personal_gain`` (None unless both others exist).

    A section is None when its scores are None (Local-only has no global model).
    ``personal_adapter`` records which adapter produced the personal scores: "personal", or
    "global" when the method has no personal model (FedIT, Centralised) and the global adapter
    was scored per client.
    ``client_weights`` (e.g. train-set sizes) override the test-example counts in the weighted
    mean. ``global_label`` (``Models.global_label``) names the global model in every printout.
    """
    if personal_adapter not in ("personal", "global"):
        raise ValueError(f"personal_adapter={personal_adapter!r}; allowed: personal, global")
    report: dict[str, Any] = {"global": None, "personal": None, "personal_gain": None}
    if global_scores is not None:
        report["global"] = {
            "label": global_label,
            "metrics": summarise(global_scores),
            "n_clients": len({s.client_id for s in global_scores}),
            "by_category": by_category(global_scores),
        }
    if personal_scores is not None:
        per_client = {cid: summarise(g) for cid, g in _by_key(personal_scores, "client_id").items()}
        weights = client_weights or {cid: m["n_examples"] for cid, m in per_client.items()}
        missing = sorted(set(per_client) - set(weights))
        if missing:
            raise ValueError(f"client_weights has no entry for clients {missing}")
        report["personal"] = {
            "adapter": personal_adapter,
            "summary": across_clients(per_client, weights),
            "per_client": per_client,
            "by_category": by_category(personal_scores),
        }
    if global_scores is not None and personal_scores is not None:
        report["personal_gain"] = personal_gain(global_scores, personal_scores, personal_adapter)
    return report


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def gain_table(gain: Mapping[str, Any], global_label: str = "global") -> list[str]:
    """Markdown lines: the personalisation gain's spread over clients, then per client."""
    head = f"Personalisation gain = personal − {global_label}, same test rows per client"
    if gain["personal_is_global"]:
        head += " (the personal model is the global one: exactly 0, not recomputed)"
    stats = ("mean", "std", "min", "max", "share_gain")
    rows = [[n, *(_fmt(gain["summary"][n][s]) for s in stats)] for n in GAIN_METRICS]
    lines = [head + "; loss < 0 / ROUGE-L > 0 = personal better:", ""]
    lines += _table(["gain", *stats], rows)
    per = [[str(c), *(_fmt(g[n]) for n in GAIN_METRICS)] for c, g in gain["per_client"].items()]
    return [*lines, "", *_table(["client", *(f"{n} gain" for n in GAIN_METRICS)], per)]


def render_markdown(report: Mapping[str, Any]) -> str:
    """Markdown tables: summary (global and personal statistics), per category, per client."""
    names = list(METRICS)
    header = ["model", *names]
    rows: list[list[str]] = []
    glob, loc = report.get("global"), report.get("personal")
    glabel = glob.get("label", "global") if glob is not None else "global"
    if glob is not None:
        rows.append([glabel, *(_fmt(glob["metrics"][n]) for n in names)])
    held_out = report.get("global_test")
    if held_out is not None:
        rows.append(
            [f"{glabel} on the global test split", *(_fmt(held_out["metrics"][n]) for n in names)]
        )
    if loc is not None:
        label = f"personal ({loc['adapter']} adapter)"
        for stat in ("mean", "weighted_mean", "worst", "std"):
            rows.append([f"{label} {stat}", *(_fmt(loc["summary"][n][stat]) for n in names)])
    if not rows:
        return "_no evaluation results_\n"
    lines = _table(header, rows)
    gain = report.get("personal_gain")
    if gain is not None:
        lines += ["", *gain_table(gain, glabel)]

    sections = [
        (tag, sec["by_category"]) for tag, sec in ((glabel, glob), ("personal", loc)) if sec
    ]
    cats = sorted({c for _, per_cat in sections for c in per_cat})
    cat_header = ["category"] + [f"{tag} {n}" for tag, _ in sections for n in ("rouge_l", "loss")]
    cat_rows = []
    for c in cats:
        row = [c]
        for _, per_cat in sections:
            m = per_cat.get(c)
            row += [_fmt(m["rouge_l"]), _fmt(m["loss"])] if m else ["", ""]
        cat_rows.append(row)
    lines += ["", *_table(cat_header, cat_rows)]

    if loc is not None:
        client_rows = [
            [str(cid), str(m["n_examples"]), *(_fmt(m[n]) for n in names)]
            for cid, m in loc["per_client"].items()
        ]
        lines += ["", *_table(["client", "n_examples", *names], client_rows)]
    return "\n".join(lines) + "\n"
