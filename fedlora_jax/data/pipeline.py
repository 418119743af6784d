"""One entry point: config + tokenizer -> per-client tokenised train sets and test splits.

Order: load and validate -> keep the ``data.include`` groups/categories -> partition (on the
validated rows, so a partition does not move when the tokenizer or max_seq_len changes) ->
per-client train/test split -> validation carve-out of the train part (``data.val_fraction``) ->
tokenise every needed row once -> drop rows that cannot fit
(counted). The table describes the partition itself.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedlora_jax.data import partition as P
from fedlora_jax.data.config import DataConfig
from fedlora_jax.data.rows import DataError, Example
from fedlora_jax.data.sources import load_source
from fedlora_jax.data.tables import CategoryTable, client_category_table
from fedlora_jax.data.tokenize import TokenizedSet, tokenize_examples


@dataclasses.dataclass(frozen=True)
class EvalSplit:
    """Held-out rows: full sequences (loss) and prompts (generation) of the same rows."""

    rows: np.ndarray  # indices into FederatedData.examples
    full: TokenizedSet
    prompts: TokenizedSet


@dataclasses.dataclass(frozen=True)
class ClientData:
    """One client's data; ``train`` feeds ``client_round_batches``; ``val`` (None when
    ``data.val_fraction`` is 0) is held out of ``train`` for choosing hyperparameters."""

    client_id: int
    name: str
    train_rows: np.ndarray
    train: TokenizedSet
    test: EvalSplit
    val: EvalSplit | None = None

    @property
    def num_train(self) -> int:
        return len(self.train)


@dataclasses.dataclass(frozen=True)
class FederatedData:
    """Everything a run needs from the data side.

    ``drop_counts`` counts every row lost, once, by reason: load-time drops (bad rows by
    reason, ``bad_gzip_tail`` for a damaged gzip tail, ``duplicate`` with dedupe), ``too_long``
    (no fit within max_seq_len: out of training and evaluation) and ``too_long_prompt`` (a test
    row whose full sequence fits but whose prompt does not fit max_prompt_len: out of
    evaluation). ``duplicates`` counts exact duplicate rows found at load (kept unless dedupe).
    ``global_test`` is Shepherd's 80-row set.
    """

    clients: list[ClientData]
    examples: list[Example]
    table: CategoryTable
    drop_counts: dict[str, int]
    duplicates: int
    global_test: EvalSplit | None
    config: DataConfig

    @property
    def weights(self) -> np.ndarray:
        """Aggregation weights: each client's number of training rows."""
        return np.array([c.num_train for c in self.clients], np.float32)

    def references(self, row_ids: np.ndarray) -> list[tuple[str, ...]]:
        """Reference answers for evaluation rows (``row_ids`` from eval batches; -1 skipped)."""
        return [self.examples[int(r)].all_references for r in np.ravel(row_ids) if r >= 0]


def _include(names: tuple[str, ...], examples: list[Example]) -> list[Example]:
    """The rows whose group (NI task, id column) or category is in ``names`` (all when empty).

    Applied before partitioning, so e.g. ``by_task`` over 8 listed NI tasks gives 8 clients.
    """
    if not names:
        return examples
    allowed = {ex.group for ex in examples if ex.group} | {ex.category for ex in examples}
    unknown = [n for n in names if n not in allowed]
    if unknown:
        listed = sorted(allowed)
        more = f", ... ({len(listed) - 40} more)" if len(listed) > 40 else ""
        raise DataError(
            f"data.include: unknown {', '.join(unknown)}; allowed: {', '.join(listed[:40])}{more}"
        )
    return [ex for ex in examples if ex.group in names or ex.category in names]


def _partition(cfg: DataConfig, examples: list[Example]) -> tuple[P.Partition, np.ndarray | None]:
    categories = np.array([ex.category for ex in examples])
    if cfg.partition == "iid":
        return P.iid(len(examples), cfg.num_clients, seed=cfg.seed), None
    if cfg.partition == "by_category":
        return P.by_category(
            categories,
            cfg.num_clients,
            categories_per_client=cfg.categories_per_client,
            seed=cfg.seed,
        ), None
    if cfg.partition == "dirichlet":
        return P.dirichlet(
            categories,
            cfg.num_clients,
            alpha=cfg.alpha,
            min_size=cfg.min_client_size,
            seed=cfg.seed,
        ), None
    if cfg.partition == "shepherd":
        if cfg.source != "dolly" or cfg.path:
            raise DataError("data.partition='shepherd': needs data.source='dolly' with path=''")
        clients, global_test = P.shepherd(np.array([ex.source_line for ex in examples]))
        if cfg.num_clients not in (0, len(clients)):
            raise DataError(f"data.num_clients={cfg.num_clients}: shepherd has {len(clients)}")
        return clients, global_test
    groups = np.array([ex.group for ex in examples])
    if not all(groups):
        raise DataError(
            f"data.partition={cfg.partition!r}: rows have no group id; set "
            "data.fields.group (NI rows carry their task)"
        )
    return P.by_group(groups, cfg.num_clients, seed=cfg.seed), None


def validation_split(
    rows: np.ndarray, *, val_fraction: float, seed: int, client_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) of one client's training rows: ``round(val_fraction * n)`` rows (at
    least one when the fraction is positive and n >= 2; train never empty), drawn from a seeded
    stream apart from the test split's, so the test rows do not depend on ``val_fraction``."""
    n = len(rows)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, n - 1) if n else 0
    perm = np.random.default_rng(np.random.SeedSequence([seed, 2, client_id])).permutation(n)
    rows = np.asarray(rows, np.int64)
    return np.sort(rows[perm[n_val:]]), np.sort(rows[perm[:n_val]])


def validation_view(data: FederatedData) -> FederatedData:
    """``data`` with each client's validation split in place of its test split, so the
    evaluation that scores the test split (``runner.evaluate_state``) scores validation."""
    if any(c.val is None for c in data.clients):
        raise DataError("data.val_fraction=0: no validation split; set data.val_fraction > 0")
    clients = [dataclasses.replace(c, test=c.val) for c in data.clients]
    return dataclasses.replace(data, clients=clients)


def prepare_federated_data(
    data_cfg: DataConfig | Mapping[str, Any], tokenizer: Any, *, verbose: bool = True
) -> FederatedData:
    """Load, validate, partition, split and tokenise (see the module docstring)."""
    cfg = data_cfg if isinstance(data_cfg, DataConfig) else DataConfig.from_mapping(data_cfg)
    loaded = load_source(
        cfg.source,
        cfg.path,
        fields=cfg.fields,
        on_bad_row=cfg.on_bad_row,
        dedupe=cfg.dedupe,
        verbose=verbose,
    )
    examples = _include(cfg.include, loaded.examples)
    parts, global_rows = _partition(cfg, examples)
    splits = [
        P.train_test_split(
            rows, test_fraction=cfg.test_fraction, test_cap=cfg.test_cap, seed=cfg.seed, client_id=k
        )
        for k, rows in enumerate(parts)
    ]
    carved = [
        validation_split(train, val_fraction=cfg.val_fraction, seed=cfg.seed, client_id=k)
        for k, (train, _) in enumerate(splits)
    ]
    eval_rows = np.concatenate(
        [s[1] for s in splits]
        + [v for _, v in carved]
        + ([global_rows] if global_rows is not None else [])
    )
    tok = {
        "template": cfg.template,
        "min_response_tokens": cfg.min_response_tokens,
        "min_instruction_tokens": cfg.min_instruction_tokens,
    }
    full, drops_full = tokenize_examples(examples, tokenizer, max_seq_len=cfg.max_seq_len, **tok)
    prompts, _ = tokenize_examples(
        examples,
        tokenizer,
        max_seq_len=cfg.max_prompt_len or cfg.max_seq_len,
        with_response=False,
        rows=np.unique(eval_rows).tolist(),
        **tok,
    )

    def eval_split(rows: np.ndarray) -> EvalSplit:
        ok = np.intersect1d(np.intersect1d(rows, full.row_ids), prompts.row_ids)
        return EvalSplit(ok, full.select_rows(ok), prompts.select_rows(ok))

    clients = []
    for k, ((_, test_rows), (train_rows, val_rows)) in enumerate(zip(splits, carved, strict=True)):
        train = full.select_rows(train_rows)
        if len(train) == 0:
            raise DataError(
                f"client {k}: no training row fits data.max_seq_len={cfg.max_seq_len}; raise it"
            )
        val = eval_split(val_rows) if cfg.val_fraction else None
        clients.append(
            ClientData(k, f"client_{k}", train.row_ids, train, eval_split(test_rows), val)
        )
    drops = collections.Counter(loaded.drop_counts)
    drops["too_long"] += drops_full.get("too_long", 0)
    # Eval rows lost only to their prompt (the rest are in too_long already): each lost row once.
    fit_eval = np.intersect1d(np.unique(eval_rows), full.row_ids)
    drops["too_long_prompt"] += len(np.setdiff1d(fit_eval, prompts.row_ids))
    drop_counts = {k: v for k, v in drops.items() if v}
    if verbose and (drops["too_long"] or drops["too_long_prompt"]):
        print(
            f"[data] tokenisation dropped {drops['too_long']} rows longer than "
            f"max_seq_len={cfg.max_seq_len} and {drops['too_long_prompt']} test rows whose "
            f"prompt is longer than max_prompt_len={cfg.max_prompt_len or cfg.max_seq_len}"
        )
    if verbose:
        n_val = sum(len(c.val.rows) for c in clients if c.val is not None)
        print(
            f"[data] splits over {len(clients)} clients: train "
            f"{sum(c.num_train for c in clients)}, validation {n_val}, test "
            f"{sum(len(c.test.rows) for c in clients)} rows (after tokenisation drops)"
        )
    categories = np.array([ex.category for ex in examples])
    return FederatedData(
        clients=clients,
        examples=examples,
        table=client_category_table(parts, categories, [c.name for c in clients]),
        drop_counts=drop_counts,
        duplicates=loaded.duplicates,
        global_test=eval_split(global_rows) if global_rows is not None else None,
        config=cfg,
    )
