"""The run loop behind ``scripts/train.py``: config -> model, data, algorithm -> rounds -> run dir.

``build`` does the expensive, config-determined work once (load the model, partition and tokenise
the data, build the algorithm); ``run`` drives the rounds, evaluation, logging and checkpoints.
Passing the same ``Setup`` to several ``run`` calls reuses the compiled round and evaluation
functions (the engine and the harness cache them per algorithm phase and shape).

Run directory: ``config.json`` (resolved config), ``clients.csv`` (client x category table),
``metrics.jsonl``, ``tb/`` (TensorBoard), ``checkpoints/``, and at the end ``final_eval.json``,
``results.md`` and ``metrics.png``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from fedlora_jax import algorithms
from fedlora_jax import config as config_lib
from fedlora_jax.algorithms.base import Algorithm, OptionsError, Phase, reads_run_length
from fedlora_jax.algorithms.rank_mask import parse_client_ranks
from fedlora_jax.algorithms.training import ClientTraining
from fedlora_jax.checkpoint import Checkpointer
from fedlora_jax.config import ConfigError, RunConfig
from fedlora_jax.data.batches import (
    client_round_batches,
    packed_round_batches,
    packing_efficiency,
    stack_clients,
)
from fedlora_jax.data.pipeline import FederatedData, prepare_federated_data
from fedlora_jax.data.tokenize import TokenizedSet
from fedlora_jax.eval.harness import EvalExample, evaluate, from_tokenized
from fedlora_jax.federated import distributed
from fedlora_jax.federated.engine import EngineConfig, EngineState, init_state, run_round
from fedlora_jax.federated.engine import models as engine_models
from fedlora_jax.federated.sampling import num_sampled
from fedlora_jax.logging import (
    MetricsLogger,
    excluded_clients,
    flatten,
    json_safe,
    no_valid_client,
    rewrite_metrics,
)
from fedlora_jax.model.config import LlamaConfig
from fedlora_jax.model.hub import locate, resolve_model
from fedlora_jax.model.sharded_load import sharded_load
from fedlora_jax.model.tokenizer import load_tokenizer
from fedlora_jax.privacy import run as dp_run
from fedlora_jax.privacy.private import DpSettings
from fedlora_jax.protocol import eval_rows
from fedlora_jax.report import CONFIG_FILE, FINAL_EVAL_FILE, drop_line, write_results

PyTree = Any
Config = ConfigDict | RunConfig  # a ConfigDict is validated into a RunConfig where it is read
CLIENT_TABLE_FILE = "clients.csv"
CHECKPOINT_DIR = "checkpoints"
# Keys that may differ between a run and its resumption: where the run lives, how often it
# checkpoints and evaluates, how long it runs, and what a round with no valid client does. None
# changes what a round computes. run.seed does (initialisation, client sampling), as does every
# other key; so does federated.rounds for an algorithm whose schedule reads the run length
# (``_resumable``). Donating buffers changes no number.
RESUMABLE_CHANGES = (
    "federated.rounds", "run.out_dir", "run.name", "run.tag", "run.on_no_valid_client",
    "checkpoint.", "eval.every", "federated.donate",
)  # fmt: skip


@dataclasses.dataclass
class Setup:
    """Everything built from a config before the first round."""

    model_cfg: LlamaConfig
    base: PyTree
    tokenizer: Any
    training: ClientTraining
    algorithm: Algorithm
    engine: EngineConfig
    data: FederatedData
    batches: RoundBatches
    privacy: DpSettings | None = None  # dp.enabled: the resolved DP settings


@dataclasses.dataclass
class RunResult:
    run_dir: pathlib.Path
    state: EngineState
    history: list[dict[str, Any]]
    final_eval: dict[str, Any] | None  # None when the run stopped before its last round
    stopped: str | None = None  # why a round with no valid client stopped the run


class NoValidClientError(RuntimeError):
    """A round in which every sampled client sent non-finite values, under
    ``run.on_no_valid_client="error"``; the run dir holds its checkpoint and results.md."""


def client_training(cfg: Config, model_cfg: LlamaConfig) -> ClientTraining:
    """What every client trains with: the optim section, the adapter and model settings."""
    rc = config_lib.typed(cfg)
    return rc.optim.client_training(
        model_cfg, rc.adapter_config(), rc.federated.local_steps, rc.model
    )


def sampled_per_round(cfg: Config, num_clients: int) -> int:
    f = config_lib.typed(cfg).federated
    return num_sampled(num_clients, f.clients_per_round or None, f.client_fraction or None)


def engine_config(cfg: Config) -> EngineConfig:
    rc = config_lib.typed(cfg)
    return rc.federated.engine_config(rc.run.seed)


def build_algorithm(cfg: Config, training: ClientTraining, num_clients: int) -> Algorithm:
    """``algorithms.get(name)(training, **options)``; a wrong option is a one-line error
    (``algorithms.base.OptionsError``) listing the valid options with types and defaults."""
    rc = config_lib.typed(cfg)
    builder = algorithms.get(rc.algorithm.name)
    options = dict(rc.algorithm.options)
    if rc.algorithm.name == "centralized":  # same examples per round as the federated runs
        options.setdefault("clients_per_round", sampled_per_round(rc, num_clients))
    if rc.federated.client_ranks or "client_ranks" in options:
        options["client_ranks"] = _client_ranks(rc, builder, options, num_clients)
    try:
        return builder(training, **options)
    except OptionsError as e:
        raise ConfigError(str(e)) from None


def _client_ranks(cfg: RunConfig, builder: Any, options: dict, num_clients: int) -> str:
    """federated.client_ranks resolved to one rank per client ("2,4,8,8"), the option of the
    algorithms that train heterogeneous ranks; a ConfigError for any other algorithm."""
    spec, name = cfg.federated.client_ranks, cfg.algorithm.name
    if "client_ranks" in options:
        raise ConfigError("set federated.client_ranks, not algorithm.options.client_ranks")
    if "client_ranks" not in {f.name for f in dataclasses.fields(builder.options)}:
        takers = [n for n in algorithms.names() if _takes_ranks(n)]
        raise ConfigError(
            f"federated.client_ranks={spec!r}: {name} trains every client at adapter.r; "
            f"algorithms with per-client ranks: {', '.join(takers)}"
        )
    try:
        ranks = parse_client_ranks(spec, num_clients, cfg.adapter.r, cfg.run.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return ",".join(map(str, ranks))


def _takes_ranks(name: str) -> bool:
    return "client_ranks" in {f.name for f in dataclasses.fields(algorithms.get(name).options)}


def load_model(cfg: Config, mesh_base: bool = True) -> tuple[LlamaConfig, PyTree, Any]:
    """(architecture, base weights in model.dtype, tokenizer) for model.spec. On the mesh
    backend (with ``mesh_base``) a safetensors folder is loaded split over federated.mesh
    (``sharded_load``): each process reads only its own devices' blocks and no host holds a
    whole leaf; else (a GGUF file, another backend) every process loads a host copy."""
    rc = config_lib.typed(cfg)
    dtype = jnp.dtype(rc.model.dtype)
    if mesh_base and rc.federated.backend == "mesh":
        path, _ = locate(rc.model.spec)
        if path.is_dir():
            mesh = distributed.mesh_of(rc.federated.mesh)
            model_cfg, base = sharded_load(path, mesh, dtype)
            return model_cfg, base, load_tokenizer(path)
    resolved = resolve_model(rc.model.spec, dtype=dtype)
    return resolved.cfg, resolved.base, resolved.tokenizer


def build(cfg: Config, *, verbose: bool = True, mesh_base: bool = True) -> Setup:
    """Load the model and data and build the algorithm for ``cfg`` (validated first);
    ``mesh_base=False``: the base as a host copy even for the mesh backend (``load_model``)."""
    rc = config_lib.typed(cfg)
    model_cfg, base, tokenizer = load_model(rc, mesh_base)
    data = prepare_federated_data(rc.data, tokenizer, verbose=verbose)
    training = client_training(rc, model_cfg)
    algorithm = build_algorithm(rc, training, len(data.clients))
    engine, dp = engine_config(rc), None
    if rc.dp.enabled:
        try:
            algorithm, engine, dp = dp_run.for_run(rc.dp, algorithm, engine, len(data.clients))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    batches = RoundBatches(data, algorithm, rc)
    return Setup(model_cfg, base, tokenizer, training, algorithm, engine, data, batches, dp)


class RoundBatches:
    """The engine's batch function ``(round, phase, client_ids) -> [K, steps, batch, seq]``.

    A round draws ``sum(phase steps) x batch_size`` rows from each sampled client's epoch stream
    (``data.batches.client_round_batches``) and gives the phases consecutive slices of it, so
    two phases of a round (FedLoRA-Optimizer's global and personal) see different rows. A
    pooled-data algorithm (Centralised) trains client 0 on the union of the clients' rows.
    With ``federated.packing`` the rows are packed (``packed_round_batches``); the first round
    built prints the packing efficiency (real tokens / slots).
    """

    def __init__(self, data: FederatedData, algorithm: Algorithm, cfg: Config) -> None:
        cfg = config_lib.typed(cfg)
        self._clients = [c.train for c in data.clients]
        if algorithm.pooled_data:
            self._clients = [_concat([c.train for c in data.clients])]
        self._offsets = np.cumsum([0] + [p.steps for p in algorithm.phases])
        self._phases = algorithm.phases
        self._batch_size = cfg.federated.batch_size
        self._seq_len = cfg.data.max_seq_len
        self._seed = cfg.data.seed
        self._make = packed_round_batches if cfg.federated.packing else client_round_batches
        self._cache: tuple[tuple, dict[str, np.ndarray]] | None = None

    def __call__(self, round_idx: int, phase: Phase, ids: np.ndarray) -> dict[str, np.ndarray]:
        key = (round_idx, tuple(int(i) for i in ids))
        if self._cache is None or self._cache[0] != key:
            first = self._cache is None
            per_client = [
                self._make(
                    self._clients[i],
                    steps=int(self._offsets[-1]),
                    batch_size=self._batch_size,
                    seq_len=self._seq_len,
                    seed=self._seed,
                    round=round_idx,
                    client_id=i,
                )  # fmt: skip
                for i in key[1]
            ]
            self._cache = (key, stack_clients(per_client))
            if first:
                rows = self._cache[1]["attn_mask"]
                packing = "on" if self._make is packed_round_batches else "off"
                print(
                    f"training batches: packing {packing}"
                    f", efficiency {packing_efficiency(self._cache[1]):.2f} (real tokens / slots),"
                    f" {rows.max(axis=-1).mean():.2f} examples per row (round {round_idx})"
                )
        p = self._phases.index(phase)
        lo, hi = self._offsets[p], self._offsets[p + 1]
        return {k: v[:, lo:hi] for k, v in self._cache[1].items()}


def _concat(sets: list[TokenizedSet]) -> TokenizedSet:
    return TokenizedSet(
        tokens=np.concatenate([s.tokens for s in sets]),
        lengths=np.concatenate([s.lengths for s in sets]),
        prompt_lengths=np.concatenate([s.prompt_lengths for s in sets]),
        row_ids=np.concatenate([s.row_ids for s in sets]),
        pad_id=sets[0].pad_id,
    )


def client_test_sets(data: FederatedData, cap: int) -> list[list[EvalExample]]:
    """Each client's test split as harness examples; the first ``cap`` rows (0 = all)."""
    out = []
    for client in data.clients:
        examples = from_tokenized(client.test.full, data.examples)
        out.append(examples[:cap] if cap else examples)
    return out


def global_test_set(data: FederatedData) -> list[EvalExample] | None:
    """The held-out global test split as harness examples (None when the partition has none)."""
    held_out = data.global_test
    return None if held_out is None else from_tokenized(held_out.full, data.examples)


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class Started:
    """A run that ``start`` checked and built on this process, ready to ``train``."""

    cfg: ConfigDict  # resolved: what config.json records
    rc: RunConfig
    run_dir: pathlib.Path
    setup: Setup
    resume: bool


def start(
    cfg: ConfigDict, *, resume: bool = False, setup: Setup | None = None, progress: bool = True
) -> Started:
    """The start-up work that can fail on one host only, before anything is written: validate
    the config, check the run directory, load the model and data and build the algorithm.
    Several processes run it inside ``distributed.start_together`` (``run`` does)."""
    config_lib.validate(cfg)
    cfg = cfg.copy_and_resolve_references()
    cfg.adapter.kind = config_lib.adapter_kind(cfg)  # config.json records the kind trained
    rc = config_lib.validate(cfg)
    run_dir = pathlib.Path(rc.run.out_dir) / config_lib.run_name(rc)
    _prepare_run_dir(run_dir, cfg, resume)
    return Started(cfg, rc, run_dir, setup or build(rc, verbose=progress), resume)


def run(
    cfg: ConfigDict,
    *,
    resume: bool = False,
    setup: Setup | None = None,
    stop_after_round: int | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> RunResult:
    """Train for ``cfg.federated.rounds`` rounds in ``out_dir/name``; continue a run with
    ``resume``. ``stop_after_round`` ends this process's work after that round (the run stays
    resumable), e.g. for time-limited jobs. Several processes agree first that all started
    with the same config (``distributed.start_together``: one line on every process if not)."""
    started = distributed.start_together(
        lambda: start(cfg, resume=resume, setup=setup, progress=progress),
        lambda s: config_lib.to_dict(s.cfg),
    )
    return train(started, stop_after_round=stop_after_round, progress=progress, echo=echo)


def train(
    started: Started,
    *,
    stop_after_round: int | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> RunResult:
    """The rounds, evaluation, logging and checkpoints of a started run (``run``)."""
    cfg, rc, run_dir, setup, resume = (
        started.cfg, started.rc, started.run_dir, started.setup, started.resume
    )  # fmt: skip
    state = init_state(setup.algorithm, setup.base, len(setup.data.clients), seed=rc.run.seed)
    history: list[dict[str, Any]] = []
    rounds = rc.federated.rounds
    keep = rc.checkpoint.keep
    with Checkpointer(run_dir / CHECKPOINT_DIR, keep=keep, identity=_identity(rc)) as ckpt:
        ckpt.ensure_space(state, copies=keep + 1)  # the kept rounds and the one being written
        if resume and ckpt.latest_step() is not None:
            state, meta = ckpt.restore(state)
            history = list(meta["history"])
        if resume:  # from the checkpoint's history: repairs a line torn by a kill mid-write
            rewrite_metrics(run_dir, history)
        _write_config(run_dir, cfg)  # only now, with model and data ready, does the run exist
        print(f"[data] {drop_line(data_summary(setup.data))}")
        if distributed.is_primary():  # process 0 writes the run directory
            setup.data.table.to_csv(run_dir / CLIENT_TABLE_FILE)
        if progress:
            print(f"client x category table ({CLIENT_TABLE_FILE}):\n{setup.data.table.to_text()}")
        with MetricsLogger(
            run_dir, rounds=rounds, resume_round=state.round, progress=progress, echo=echo
        ) as logger:
            last_report = None  # the evaluation of the round just trained, if it had one
            halted = None  # why a round with no valid client stops the run
            spent = None  # why the privacy budget stops the run
            while state.round < rounds:
                spent = dp_run.budget_stop(setup.privacy, state.round)
                if spent:
                    spent += f"; stopped with a checkpoint in {run_dir / CHECKPOINT_DIR}"
                    if ckpt.latest_step() != state.round:
                        ckpt.save(state.round, state, _meta(state, history))
                    break
                state, row, last_report = _one_round(rc, setup, state)
                history.append(row)
                logger.log(state.round, row)
                halted = _halt_reason(rc, state.round, row, run_dir)
                every = rc.checkpoint.every
                stopping = halted or (
                    stop_after_round is not None and state.round >= stop_after_round
                )
                if state.round == rounds or stopping or (every and state.round % every == 0):
                    ckpt.save(state.round, state, _meta(state, history))
                if stopping:
                    break
    final = None
    if spent:
        _write_results(run_dir, data=data_summary(setup.data), stopped=spent)
        print(spent)
        return RunResult(run_dir, state, history, None, spent)
    if halted:
        _write_results(run_dir, data=data_summary(setup.data), stopped=halted)
        if rc.run.on_no_valid_client == "error":
            raise NoValidClientError(halted)
        print(f"warning: {halted}", file=sys.stderr)
    elif state.round >= rounds:
        final = _final_eval(rc, setup, state, run_dir, last_report)
        _write_results(run_dir)
    return RunResult(run_dir, state, history, final, halted)


def _write_results(run_dir: pathlib.Path, **kwargs: Any) -> None:
    """``report.write_results`` from process 0 only."""
    if distributed.is_primary():
        write_results(run_dir, **kwargs)


def _halt_reason(
    cfg: RunConfig, round_: int, row: Mapping[str, Any], run_dir: pathlib.Path
) -> str | None:
    """The one-line reason to stop after ``round_`` (a phase in which every sampled client sent
    non-finite values), or None; always None under ``run.on_no_valid_client="continue"``."""
    mode = cfg.run.on_no_valid_client
    phases = no_valid_client(row)
    if not phases or mode == "continue":
        return None
    excluded = excluded_clients(row)
    which = "; ".join(f"phase {p}: clients {excluded[p]}" for p in phases)
    return (
        f"round {round_}: no valid client ({which} sent non-finite values), so the model was "
        f"not trained; stopped with a checkpoint in {run_dir / CHECKPOINT_DIR} "
        f"(run.on_no_valid_client={mode!r}; lower optim.lr or set optim.grad_clip > 0)"
    )


def data_summary(data: FederatedData) -> dict[str, Any]:
    """Rows the data pipeline dropped (reason -> count) and exact duplicates it found."""
    return {"drop_counts": dict(data.drop_counts), "duplicates": int(data.duplicates)}


def _identity(cfg: RunConfig) -> dict[str, Any]:
    """What a checkpoint's state shape depends on, stored in its meta so that restoring it into
    another config is one line naming both (instead of orbax's tree dump)."""
    a = cfg.adapter
    return {
        "algorithm": cfg.algorithm.name, "adapter": cfg.adapter_kind, "rank": a.r,
        "targets": a.targets, "model": cfg.model.spec,
    }  # fmt: skip


def _meta(state: EngineState, history: list[dict[str, Any]]) -> dict[str, Any]:
    # Client sampling and batches are pure functions of (seed, round, client): the round is the
    # whole data-order state.
    return {"round": int(state.round), "history": history}


def _one_round(
    cfg: RunConfig, setup: Setup, state: EngineState
) -> tuple[EngineState, dict, dict | None]:
    start, cpu_start = time.perf_counter(), time.process_time()
    state, metrics = run_round(
        setup.algorithm, state, setup.base, setup.batches, setup.data.weights, setup.engine
    )
    row = round_metrics(setup.algorithm, metrics)
    if setup.privacy is not None:
        row.update(dp_run.round_metrics(setup.privacy, state))
    row["time/train_s"] = time.perf_counter() - start
    every = cfg.eval.every
    report = None
    if state.round == cfg.federated.rounds or (every and state.round % every == 0):
        t = time.perf_counter()
        report = evaluate_state(cfg, setup, state)
        row.update(eval_metrics(report))
        row["time/eval_s"] = time.perf_counter() - t
    row["time/round_s"] = time.perf_counter() - start
    # CPU seconds of this process (all threads): comparable across loaded and idle machines
    row["time/round_cpu_s"] = time.process_time() - cpu_start
    return state, json_safe(row), report


def round_metrics(algorithm: Algorithm, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The engine's round metrics as flat scalars: ``phase/<phase>/<name>`` (means over the
    valid sampled clients; NaN when none was valid), ``train/loss`` (the first phase's: the one
    that trains the shared model) and ``comm/*``; plus the sampled ``clients`` and, per phase,
    the ``phase/<phase>/excluded`` client ids (non-finite values)."""
    row: dict[str, Any] = {"clients": [int(i) for i in metrics["clients"]]}
    for key, value in metrics.items():
        if key.startswith("comm/"):
            row[key] = value
        elif key.endswith("/excluded"):
            row[f"phase/{key}"] = [int(i) for i in value]
        elif (
            "/" in key
            and "/per_client/" not in key
            and isinstance(value, int | float)
            and not isinstance(value, bool)
        ):
            row[f"phase/{key}"] = value
    first = algorithm.phases[0].name
    if f"phase/{first}/loss" in row:
        row["train/loss"] = row[f"phase/{first}/loss"]
    return row


def eval_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """``global/<metric>``, ``global/label``, ``personal/<metric>/<mean|weighted_mean|worst|std>``,
    ``gain/<loss|rouge_l>/<mean|std|min|max|share_gain>`` (personalisation gain) and
    ``global_test/<metric>`` (the global model on a held-out global test split)."""
    row: dict[str, Any] = {}
    if report.get("global"):
        row.update(flatten(report["global"]["metrics"], "global"))
        row["global/label"] = report["global"].get("label", "global")
    if report.get("personal"):
        row.update(flatten(report["personal"]["summary"], "personal"))
    if report.get("personal_gain"):
        row.update(flatten(report["personal_gain"]["summary"], "gain"))
    if report.get("global_test"):
        row.update(flatten(report["global_test"]["metrics"], "global_test"))
    return row


def evaluate_state(cfg: Config, setup: Setup, state: EngineState) -> dict[str, Any]:
    """The eval harness's global/personal report for the models in ``state``; with a partition
    that holds out a global test split (Shepherd's 80 rows), also ``global_test``: the global
    model's metrics on it (None when either is missing)."""
    state = distributed.host_local(state)  # several processes: each evaluates alike
    cfg = config_lib.typed(cfg)
    models = engine_models(setup.algorithm, state, len(setup.data.clients), setup.engine)
    personal = None if models.personal_is_global else models.personal
    tests = client_test_sets(setup.data, cfg.eval.max_examples_per_client)
    sizes = setup.data.weights
    score = functools.partial(
        evaluate, setup.base,
        cfg=setup.model_cfg, adapter_cfg=setup.training.adapter, tokenizer=setup.tokenizer,
        max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
        compute_dtype=jnp.dtype(cfg.model.compute_dtype), global_label=models.global_label,
    )  # fmt: skip
    report = score(
        models.global_, personal, tests, client_weights={i: float(s) for i, s in enumerate(sizes)}
    )
    held_out = global_test_set(setup.data)
    report["global_test"] = None
    if held_out is not None and models.global_ is not None:
        report["global_test"] = score(models.global_, None, [held_out])["global"]
    return report


def _final_eval(
    cfg: RunConfig,
    setup: Setup,
    state: EngineState,
    run_dir: pathlib.Path,
    report: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the final report; ``report`` is the last round's evaluation when it had one (so
    the last round is not evaluated twice), else the state is evaluated now (e.g. on resume)."""
    report = report if report is not None else evaluate_state(cfg, setup, state)
    report = json_safe({**report, "round": int(state.round)})
    tests = client_test_sets(setup.data, cfg.eval.max_examples_per_client)
    rows = eval_rows(tests, global_test_set(setup.data))  # what compare.py holds equal
    saved = {**report, "data": data_summary(setup.data), "eval_rows": rows}  # and the drops
    if distributed.is_primary():
        (run_dir / FINAL_EVAL_FILE).write_text(json.dumps(saved, indent=1, allow_nan=False))
    return report


def evaluate_checkpoint(
    run_dir: str | pathlib.Path,
    *,
    round_: int | None = None,
    overrides: Sequence[str] = (),
    setup: Setup | None = None,
) -> dict[str, Any]:
    """The report for a run's checkpoint (latest by default); ``overrides`` may set eval.*."""
    run_dir = pathlib.Path(run_dir)
    saved = run_dir / CONFIG_FILE
    if not saved.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    cfg = config_lib.from_dict(_read_config(saved))
    bad = [o for o in overrides if not o.startswith("eval.")]
    if bad:
        raise ConfigError(f"evaluate: only eval.* keys may be overridden, got {bad}")
    config_lib.apply_overrides(cfg, overrides)
    cfg = config_lib.validate(cfg)
    ckpt = Checkpointer(run_dir / CHECKPOINT_DIR, keep=cfg.checkpoint.keep, identity=_identity(cfg))
    with ckpt:
        ckpt.check_identity(round_)  # before the expensive build
        setup = setup or build(cfg, verbose=False, mesh_base=False)  # on whatever devices
        state = init_state(setup.algorithm, setup.base, len(setup.data.clients), seed=cfg.run.seed)
        state, _ = ckpt.restore(state, step=round_)
    report = evaluate_state(cfg, setup, state)
    report["round"] = int(state.round)
    return report


# ----------------------------------------------------------------------------- run dir


def _prepare_run_dir(run_dir: pathlib.Path, cfg: ConfigDict, resume: bool) -> None:
    """Check, before the expensive build, that ``run_dir`` can take this run: a new run needs a
    directory without ``config.json`` (a failed start leaves none), a resumed one the same config
    up to ``RESUMABLE_CHANGES``; and the directory must be writable. ``config.json`` itself is
    written by ``_write_config`` once the model and data are ready."""
    saved_path = run_dir / CONFIG_FILE
    if resume:
        if not saved_path.is_file():
            raise ConfigError(
                f"--resume: nothing to resume at {run_dir} (no {CONFIG_FILE}); drop --resume to "
                "start the run"
            )
        allowed = _resumable(cfg)
        changed = _changed_keys(_saved_config(saved_path), config_lib.to_dict(cfg), allowed)
        if changed:
            raise ConfigError(
                f"--resume: the config differs from {saved_path} in {', '.join(changed)}; "
                f"only {', '.join(allowed)} may change"
            )
    elif saved_path.exists():
        raise ConfigError(
            f"{run_dir} already holds a run; pass --resume to continue it, or set "
            "run.name / run.out_dir for a new one"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as e:
        reason = "not a directory" if isinstance(e, FileExistsError) else e.strerror or str(e)
        raise ConfigError(
            f"run.out_dir={cfg.run.out_dir!r}: cannot write the run directory "
            f"{e.filename or run_dir}: {reason}"
        ) from None


def _resumable(cfg: ConfigDict) -> tuple[str, ...]:
    """``RESUMABLE_CHANGES`` less federated.rounds when the algorithm's schedule reads the run
    length (its Options say so: FedLoRA-Optimizer's ``local_phase=final``)."""
    options = cfg.algorithm.options.to_dict()
    try:
        reads = reads_run_length(cfg.algorithm.name, options)
    except OptionsError as e:
        raise ConfigError(str(e)) from None
    if reads or (cfg.dp.enabled and not cfg.dp.noise_multiplier):  # σ calibrated on the rounds
        return tuple(k for k in RESUMABLE_CHANGES if k != "federated.rounds")
    return RESUMABLE_CHANGES


def _read_config(path: pathlib.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); it is the "
            "run's saved config: restore it, or start a new run elsewhere"
        ) from None


def _saved_config(path: pathlib.Path) -> dict[str, Any]:
    """The saved config on today's schema: a key added since the run was saved reads as its
    default (so it counts as changed only when this run sets it to something else)."""
    try:
        return config_lib.to_dict(config_lib.from_dict(_read_config(path)))
    except ConfigError as e:
        raise ConfigError(f"--resume: {path}: {e}") from None


def _write_config(run_dir: pathlib.Path, cfg: ConfigDict) -> None:
    """Write ``config.json`` atomically (a kill mid-write leaves the old one or none)."""
    if not distributed.is_primary():
        return
    tmp = run_dir / f"{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(config_lib.to_dict(cfg), indent=1, sort_keys=True))
    tmp.replace(run_dir / CONFIG_FILE)


def _changed_keys(
    old: Mapping[str, Any], new: Mapping[str, Any], allowed: tuple[str, ...] = RESUMABLE_CHANGES
) -> list[str]:
    flat_old, flat_new = _flat(old), _flat(new)
    keys = sorted(set(flat_old) | set(flat_new))
    return [
        k for k in keys
        if flat_old.get(k) != flat_new.get(k) and not k.startswith(allowed)
    ]  # fmt: skip


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(v, name + "."))
        else:
            out[name] = v
    return out
