"""Partitioners: pure seeded functions from row metadata to one index array per client.

Every partitioner is an exact cover of the rows it is given (each index in exactly one client,
or in Shepherd's global test set), deterministic for a seed and sorted within a client.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from fedlora_jax.data.rows import DataError

Partition = list[np.ndarray]
PARTITIONS = ("iid", "by_category", "dirichlet", "by_task", "shepherd", "by_column")
ALIASES = {"category": "by_category", "task": "by_task", "column": "by_column"}


def _rng(seed: int, *stream: int) -> np.random.Generator:
    """An independent generator per (seed, stream...), stable across numpy versions' defaults."""
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


def _finish(parts: list[list[int]] | list[np.ndarray]) -> Partition:
    return [np.sort(np.asarray(p, np.int64)) for p in parts]


def _check_clients(num_clients: int, n: int) -> None:
    if num_clients < 1:
        raise DataError(f"data.num_clients={num_clients}: must be at least 1")
    if num_clients > n:
        raise DataError(f"data.num_clients={num_clients}: more clients than rows ({n})")


def iid(n: int, num_clients: int, *, seed: int) -> Partition:
    """A seeded shuffle cut into ``num_clients`` near-equal parts (sizes differ by at most 1)."""
    _check_clients(num_clients, n)
    return _finish(np.array_split(_rng(seed).permutation(n), num_clients))


def by_category(
    categories: np.ndarray, num_clients: int, *, categories_per_client: int, seed: int
) -> Partition:
    """Each client holds ``categories_per_client`` categories; a category's rows are split
    evenly among the clients holding it.

    Categories are dealt cyclically from a seeded permutation: client c holds
    ``perm[(c * k + j) % C]`` for j < k, so every category is held when ``num_clients * k >= C``.
    """
    names, codes = np.unique(np.asarray(categories), return_inverse=True)
    n_cat, k = len(names), categories_per_client
    _check_clients(num_clients, len(codes))
    if not 1 <= k <= n_cat:
        raise DataError(f"data.categories_per_client={k}: must be in [1, {n_cat}] (categories)")
    if num_clients * k < n_cat:
        raise DataError(
            f"data.categories_per_client={k}: with {num_clients} clients only {num_clients * k} "
            f"of {n_cat} categories would be held; raise it to >= {-(-n_cat // num_clients)}"
        )
    rng = _rng(seed)
    perm = rng.permutation(n_cat)
    holders: list[list[int]] = [[] for _ in range(n_cat)]
    for c in range(num_clients):
        for j in range(k):
            holders[perm[(c * k + j) % n_cat]].append(c)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for cat in range(n_cat):
        rows = rng.permutation(np.flatnonzero(codes == cat))
        for client, chunk in zip(
            holders[cat], np.array_split(rows, len(holders[cat])), strict=True
        ):
            parts[client].extend(chunk.tolist())
    return _finish(parts)


def allocate_category(
    rows: np.ndarray, proportions: np.ndarray, sizes: np.ndarray, cap: float
) -> list[np.ndarray]:
    """One step of the Dirichlet allocation: split one category's (shuffled) rows by proportions.

    Clients already holding ``cap`` (= N / K) rows get nothing (NIID-Bench's balancing); the
    rest of the proportions are renormalised and cut at ``floor(cumsum(p) * len(rows))``.
    """
    p = np.where(sizes < cap, proportions, 0.0)
    p = p / p.sum() if p.sum() > 0 else (sizes < cap) / max(1, int((sizes < cap).sum()))
    cuts = (np.cumsum(p) * len(rows)).astype(np.int64)[:-1]
    return np.split(rows, cuts)


def dirichlet(
    categories: np.ndarray,
    num_clients: int,
    *,
    alpha: float,
    min_size: int,
    seed: int,
    max_tries: int = 1000,
) -> Partition:
    """The standard per-category Dirichlet(alpha) allocation (Hsu et al. 2019; NIID-Bench code).

    For each category in sorted order: shuffle its rows, draw p ~ Dir(alpha * 1_K), split them
    with ``allocate_category``. Redrawn (the same generator continues) until every client has at
    least ``min_size`` rows. Small alpha = skewed clients; alpha -> inf = IID.
    """
    if alpha <= 0:
        raise DataError(f"data.alpha={alpha}: must be > 0")
    names, codes = np.unique(np.asarray(categories), return_inverse=True)
    n = len(codes)
    _check_clients(num_clients, n)
    if min_size * num_clients > n:
        raise DataError(
            f"data.min_client_size={min_size}: {num_clients} clients x {min_size} "
            f"exceeds the {n} rows"
        )
    rng = _rng(seed)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for cat in range(len(names)):
            rows = rng.permutation(np.flatnonzero(codes == cat))
            p = rng.dirichlet(np.full(num_clients, alpha))
            sizes = np.array([len(x) for x in parts])
            for client, chunk in enumerate(allocate_category(rows, p, sizes, n / num_clients)):
                parts[client].extend(chunk.tolist())
        if min(len(x) for x in parts) >= min_size:
            return _finish(parts)
    raise DataError(
        f"data.min_client_size={min_size}: not reached in {max_tries} Dirichlet "
        f"draws with alpha={alpha}; lower it or raise data.alpha"
    )


def by_group(groups: np.ndarray, num_clients: int | None, *, seed: int) -> Partition:
    """Client = natural group (NI task, a user id column).

    ``num_clients`` None/0 or equal to the number of groups: one group per client, in sorted
    group order. Fewer clients: groups are dealt round-robin from a seeded permutation.
    """
    names, codes = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = len(names)
    k = num_clients or n_groups
    if k > n_groups:
        raise DataError(f"data.num_clients={k}: only {n_groups} groups (tasks/ids) to give out")
    owner = np.arange(n_groups) if k == n_groups else np.empty(n_groups, np.int64)
    if k != n_groups:
        owner[_rng(seed).permutation(n_groups)] = np.arange(n_groups) % k
    return _finish([np.flatnonzero(owner[codes] == c) for c in range(k)])


def shepherd_ranges(path: str | pathlib.Path | None = None) -> dict[str, tuple[int, int]]:
    """Shepherd's split as {split name: [start, end) 0-based line range} (shipped file default)."""
    from fedlora_jax.data.sources import resource_path

    p = pathlib.Path(path) if path else resource_path("dolly", "shepherd_10client_split.json")
    return {
        r["split"]: (int(r["start"]), int(r["end"])) for r in json.loads(p.read_text())["ranges"]
    }


def shepherd(source_lines: np.ndarray) -> tuple[Partition, np.ndarray]:
    """FederatedGPT-Shepherd's 10-client Dolly split: (clients, global_test) as row indices.

    Rows are matched by their 1-based ``source_line`` in the shipped Dolly file, so dropped rows
    simply vanish from their range. Rows outside every range are an error (not that file).
    """
    lines = np.asarray(source_lines, np.int64) - 1
    ranges = shepherd_ranges()
    if lines.size and lines.max() >= max(end for _, end in ranges.values()):
        raise DataError(
            "data.partition='shepherd': needs the shipped Dolly file (source=dolly, path='')"
        )

    def rows(split: str) -> np.ndarray:
        start, end = ranges[split]
        return np.flatnonzero((lines >= start) & (lines < end))

    clients = sorted(
        (s for s in ranges if s != "global_test"), key=lambda s: int(s.rsplit("_", 1)[1])
    )
    return [rows(s) for s in clients], rows("global_test")


def train_test_split(
    rows: np.ndarray, *, test_fraction: float, test_cap: int, seed: int, client_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded per-client split: ``min(test_cap, round(test_fraction * n))`` test rows
    (``test_cap = 0``: no cap).

    At least one test row when the fraction is positive and the client has two rows or more;
    the train part is never empty. Both parts are sorted.
    """
    if not 0 <= test_fraction < 1:
        raise DataError(f"data.test_fraction={test_fraction}: must be in [0, 1)")
    n = len(rows)
    n_test = int(round(test_fraction * n))
    if test_cap > 0:
        n_test = min(test_cap, n_test)
    if test_fraction > 0 and n >= 2:
        n_test = max(1, n_test)
    n_test = min(n_test, n - 1) if n else 0
    perm = _rng(seed, 1, client_id).permutation(n)
    rows = np.asarray(rows, np.int64)
    return np.sort(rows[perm[n_test:]]), np.sort(rows[perm[:n_test]])
