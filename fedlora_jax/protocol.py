"""The comparison protocol (docs/protocol.md): every method in a comparison trains the same
client gradient steps on the same rows per round, and its learning rate is chosen on a
validation split from a grid declared per method.

``Budget`` is what a run trains per round, counted from its algorithm's phases (every phase:
FedLoRA-Optimizer's global E_g and personal E_l steps both count, E_l in the last round only
under ``local_phase=final``; Ditto splits one phase's steps between its two models).
``check_budgets`` refuses a comparison whose budgets differ with one line naming the runs and
their budgets. ``Grid`` declares a reproduction (methods × seeds × settings, an lr grid per
method) for ``scripts/reproduce.py``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fedlora_jax.algorithms.base import Algorithm
from fedlora_jax.model.config import LlamaConfig

if TYPE_CHECKING:
    from fedlora_jax.eval.harness import EvalExample

# The phases' step counts never depend on the model, so the budget of a saved config is counted
# by building its algorithm on this small stand-in architecture (no weights are loaded).
STAND_IN = LlamaConfig(
    vocab_size=32, hidden_size=256, intermediate_size=512, num_layers=1, num_heads=4,
    num_kv_heads=4, head_dim=64,
)  # fmt: skip


class BudgetMismatch(ValueError):
    """Runs compared under the protocol train different budgets; the CLI prints one line."""


@dataclasses.dataclass(frozen=True)
class Budget:
    """Per round: ``trainers`` clients (1 for a pooled-data algorithm) each train the phases'
    steps on ``batch_size`` rows a step (packed rows hold several examples). A phase named in
    ``last_round_only`` trains in the last round only (FedLoRA-Optimizer's personal phase under
    ``local_phase=final``), so the last round can train more than the others."""

    rounds: int
    trainers: int
    phase_steps: tuple[tuple[str, int], ...]
    batch_size: int
    packing: bool
    last_round_only: tuple[str, ...] = ()

    def client_steps(self, last: bool) -> int:
        """One client's steps in the last round (``last``) or in any earlier one."""
        return sum(s for n, s in self.phase_steps if last or n not in self.last_round_only)

    @property
    def steps_per_client(self) -> int:
        """In a round before the last (in the only round of a one-round run)."""
        return self.client_steps(last=self.rounds <= 1)

    @property
    def rows_per_client(self) -> int:
        return self.steps_per_client * self.batch_size

    @property
    def steps_per_round(self) -> int:
        return self.trainers * self.steps_per_client

    @property
    def rows_per_round(self) -> int:
        return self.steps_per_round * self.batch_size

    @property
    def last_round_steps(self) -> int:
        return self.trainers * self.client_steps(last=True)

    @property
    def last_round_rows(self) -> int:
        return self.last_round_steps * self.batch_size

    @property
    def total_steps(self) -> int:
        """Every trainer's steps over the run."""
        return (self.rounds - 1) * self.steps_per_round + self.last_round_steps

    @property
    def total_rows(self) -> int:
        return self.total_steps * self.batch_size

    def key(self) -> tuple[int, int, int, int, int, bool]:
        """What the protocol holds equal: rounds, gradient steps and rows in every round (the
        rounds before the last are alike; the last may differ), packing."""
        return (
            self.rounds, self.steps_per_round, self.rows_per_round,
            self.last_round_steps, self.last_round_rows, self.packing,
        )  # fmt: skip

    def describe(self) -> str:
        """``2 rounds x 4 clients x (global 1 + personal 1) steps x 2 rows (packed) = 8 steps,
        16 rows per round``; a last round that trains more adds ``(12 steps, 24 rows in the
        last round)``."""

        def phase(name: str, steps: int) -> str:
            return f"{name} {steps}" + (" last round only" if name in self.last_round_only else "")

        steps = (
            "(" + " + ".join(phase(n, s) for n, s in self.phase_steps) + ")"
            if len(self.phase_steps) > 1
            else str(self.steps_per_client)
        )
        rows = "packed" if self.packing else "unpacked"
        text = (
            f"{self.rounds} rounds x {self.trainers} clients x {steps} steps x "
            f"{self.batch_size} rows ({rows}) = {self.steps_per_round} steps, "
            f"{self.rows_per_round} rows per round"
        )
        if self.last_round_steps != self.steps_per_round:
            text += (
                f" ({self.last_round_steps} steps, {self.last_round_rows} rows in the last round)"
            )
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "steps_per_client": self.steps_per_client,
            "rows_per_client": self.rows_per_client,
            "steps_per_round": self.steps_per_round,
            "rows_per_round": self.rows_per_round,
            "last_round_steps": self.last_round_steps,
            "last_round_rows": self.last_round_rows,
            "total_steps": self.total_steps,
            "total_rows": self.total_rows,
            "text": self.describe(),
        }


def algorithm_budget(
    algorithm: Algorithm, *, rounds: int, clients_per_round: int, batch_size: int, packing: bool
) -> Budget:
    """The budget of ``algorithm`` run for ``rounds`` rounds with ``clients_per_round`` sampled
    clients (a pooled-data algorithm trains one client per round on the union)."""
    trainers = 1 if algorithm.pooled_data else clients_per_round
    phases = tuple((p.name, int(p.steps)) for p in algorithm.phases)
    last_only = tuple(p.name for p in algorithm.phases if p.last_round_only)
    return Budget(int(rounds), int(trainers), phases, int(batch_size), bool(packing), last_only)


def config_budget(cfg: Any, num_clients: int, model_cfg: LlamaConfig = STAND_IN) -> Budget:
    """The budget of a run config (a ConfigDict) over ``num_clients`` clients: its algorithm
    built as the runner builds it (``model_cfg`` only shapes adapters, never steps)."""
    from fedlora_jax import runner

    training = runner.client_training(cfg, model_cfg)
    algorithm = runner.build_algorithm(cfg, training, num_clients)
    return algorithm_budget(
        algorithm,
        rounds=cfg.federated.rounds,
        clients_per_round=runner.sampled_per_round(cfg, num_clients),
        batch_size=cfg.federated.batch_size,
        packing=cfg.federated.packing,
    )


def run_dir_budget(run_dir: str | pathlib.Path) -> Budget:
    """The budget of a run directory, from its ``config.json`` and ``clients.csv``."""
    from fedlora_jax import config as config_lib

    run_dir = pathlib.Path(run_dir)
    for name in ("config.json", "clients.csv"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir}: no {name}, so its budget cannot be counted")
    with open(run_dir / "clients.csv", newline="") as f:
        num_clients = sum(1 for _ in csv.reader(f)) - 1  # one row per client under a header
    cfg = config_lib.from_dict(json.loads((run_dir / "config.json").read_text()))
    return config_budget(cfg, num_clients)


def check_budgets(budgets: Mapping[str, Budget]) -> None:
    """Raise ``BudgetMismatch`` (one line naming every run and its budget) unless all
    ``budgets`` agree on rounds, gradient steps and rows per round and packing."""
    if len({b.key() for b in budgets.values()}) <= 1:
        return
    listed = "; ".join(f"{name}: {b.describe()}" for name, b in budgets.items())
    raise BudgetMismatch(
        f"budgets differ, so the comparison is refused (docs/protocol.md): {listed}; give every "
        "method the same client steps and rows per round (FedLoRA-Optimizer: "
        "algorithm.options.global_steps + local_steps_personal = federated.local_steps)"
    )


# ----------------------------------------------------------------------------- evaluation rows

# What identifies a run's evaluation rows when its final_eval.json records no digest (a run
# from before ``eval_rows``): the config keys its test split and the evaluation cap come from.
ROW_KEYS = ("data", "model.spec", "eval.max_examples_per_client")


class EvalRowsMismatch(ValueError):
    """Runs compared under the protocol were scored on different rows; the CLI prints one line."""


def eval_rows(
    client_tests: Sequence[Sequence[EvalExample]], global_test: Sequence[EvalExample] | None
) -> dict[str, Any]:
    """What ``final_eval.json`` records of the rows a run was scored on: examples per client,
    the held-out global test split's size (None without one), and a sha256 over every example's
    tokens, response mask and references, client by client (so the same rows give the same
    digest whichever method was scored on them)."""
    digest = hashlib.sha256()
    for examples in [*client_tests, global_test or []]:
        rows = [[e.prompt_ids, e.tokens, e.loss_mask, e.references] for e in examples]
        digest.update(json.dumps(rows).encode() + b"\n")
    return {
        "clients": [len(t) for t in client_tests],
        "global_test": None if global_test is None else len(global_test),
        "sha256": digest.hexdigest(),
    }


def run_dir_eval_rows(run_dir: str | pathlib.Path) -> dict[str, Any] | None:
    """The ``eval_rows`` record of a run directory's final_eval.json; None when it has none (no
    final_eval.json yet, or one written before the record existed)."""
    path = pathlib.Path(run_dir) / "final_eval.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("eval_rows")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def rows_of_runs(run_dirs: Sequence[str | pathlib.Path]) -> tuple[dict[str, Any], list[str]]:
    """What identifies each run's evaluation rows, for ``check_eval_rows``: the runs'
    ``eval_rows`` records, or, when any run has none, every run's ``ROW_KEYS`` config; and the
    runs without a record (say so: their rows are only compared by config)."""
    recorded = {str(d): run_dir_eval_rows(d) for d in run_dirs}
    missing = [d for d, r in recorded.items() if r is None]
    if not missing:
        return recorded, []
    return {d: run_dir_row_config(d) for d in recorded}, missing


def run_dir_row_config(run_dir: str | pathlib.Path) -> dict[str, Any]:
    """The run's ``ROW_KEYS`` from its config.json, flattened (``data.seed`` → value)."""
    cfg = json.loads((pathlib.Path(run_dir) / "config.json").read_text())
    out: dict[str, Any] = {}
    for key in ROW_KEYS:
        node: Any = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping):
            out.update({f"{key}.{k}": v for k, v in sorted(node.items())})
        else:
            out[key] = node
    return out


def check_eval_rows(rows: Mapping[str, Mapping[str, Any]], groups: Mapping[str, str]) -> None:
    """Raise ``EvalRowsMismatch`` (one line) unless every group (method) of the runs was scored
    on the same collection of row sets. ``rows``: run -> what identifies its rows (an
    ``eval_rows`` record, or its ``ROW_KEYS`` config); ``groups``: run -> group. The runs of one
    group may differ (seeds with their own data seed) when every other group has the same ones.
    The line names each run's row set (R1, R2, ...) and the fields in which the sets differ."""
    fingerprint = {run: json.dumps(r, sort_keys=True) for run, r in rows.items()}
    members: dict[str, list[str]] = {}
    for run, group in groups.items():
        members.setdefault(group, []).append(run)
    if len({tuple(sorted(fingerprint[r] for r in runs)) for runs in members.values()}) <= 1:
        return
    first: dict[str, str] = {}  # fingerprint -> the first run with it
    for run, f in fingerprint.items():
        first.setdefault(f, run)
    label = {f: f"R{i + 1}" for i, f in enumerate(first)}
    keys = dict.fromkeys(k for r in rows.values() for k in r)
    varying = [k for k in keys if len({json.dumps(r.get(k)) for r in rows.values()}) > 1]
    listed = "; ".join(
        f"{group}: " + ", ".join(f"{run} {label[fingerprint[run]]}" for run in runs)
        for group, runs in members.items()
    )
    sets = ", ".join(
        f"{label[f]} = " + " ".join(f"{k}={json.dumps(rows[run].get(k))}" for k in varying)
        for f, run in first.items()
    )
    raise EvalRowsMismatch(
        f"evaluation rows differ, so the comparison is refused (docs/protocol.md): {listed}; "
        f"{sets}; score every method on the same test rows (per seed: one data preparation, "
        "the same tokenizer and eval.max_examples_per_client)"
    )


# ----------------------------------------------------------------------------- grids


@dataclasses.dataclass(frozen=True)
class Method:
    """A method of a comparison: its name in the tables, the config overrides that make it
    (``algorithm.name=...``, options) and its learning-rate grid (``optim.lr``)."""

    name: str
    overrides: tuple[str, ...]
    lrs: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Setting:
    """A data setting: a config preset (``configs/x.py:preset``) and overrides."""

    name: str
    config: str
    overrides: tuple[str, ...] = ()
    description: str = ""
    strong_non_iid: bool = False  # where "under strong non-IID" claims are tested


@dataclasses.dataclass(frozen=True)
class Grid:
    """methods × seeds × settings. ``common`` overrides apply to every cell (budget, eval);
    ``baseline`` names the method the paired differences are taken against. The lr of each
    method is chosen on seed ``seeds[0]``'s validation split; the other seeds run it."""

    name: str
    methods: tuple[Method, ...]
    settings: tuple[Setting, ...]
    seeds: tuple[int, ...]
    common: tuple[str, ...]
    baseline: str = "fedit"
    description: str = ""
    notes: str = ""  # printed under the report's heading: scale, caveats, the other protocol

    def __post_init__(self) -> None:
        names = [m.name for m in self.methods]
        if self.baseline not in names:
            raise ValueError(f"grid {self.name}: baseline {self.baseline!r} not in {names}")
        if not self.seeds or any(not m.lrs for m in self.methods):
            raise ValueError(f"grid {self.name}: needs seeds and an lr grid for every method")


def cell_overrides(grid: Grid, setting: Setting, method: Method, lr: float, seed: int) -> list:
    """The overrides of one cell, in order: setting, common, method, lr and seed (the run seed
    and the data seed: partition, validation carve-out and batch order vary with the seed)."""
    return [
        *setting.overrides, *grid.common, *method.overrides,
        f"optim.lr={lr!r}", f"run.seed={seed}", f"data.seed={seed}",
    ]  # fmt: skip


def choose_lr(scores: Mapping[float, float]) -> float:
    """The lr with the lowest validation score (a non-finite score never wins; ties go to the
    smaller lr); a ValueError when no lr gave a finite score."""
    finite = {lr: s for lr, s in scores.items() if math.isfinite(s)}
    if not finite:
        raise ValueError(f"no learning rate gave a finite validation score: {dict(scores)}")
    return min(finite, key=lambda lr: (finite[lr], lr))
