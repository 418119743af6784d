"""Client sampling keyed on (seed, round): pure and reproducible across backends and restarts."""

from __future__ import annotations

import math

import numpy as np


def num_sampled(num_clients: int, count: int | None = None, fraction: float | None = None) -> int:
    """K per round from a count or a fraction (FedAvg's max(round(C·N), 1)); all if neither."""
    if num_clients < 1:
        raise ValueError(f"num_clients={num_clients} must be >= 1")
    if count is not None and fraction is not None:
        raise ValueError("give federated.clients_per_round or federated.client_fraction, not both")
    if count is not None:
        if not 1 <= count <= num_clients:
            raise ValueError(
                f"federated.clients_per_round={count} must be in [1, {num_clients}] "
                f"(the number of clients); no clients would be sampled otherwise"
            )
        return int(count)
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"federated.client_fraction={fraction} must be in (0, 1]")
        return max(1, min(num_clients, math.floor(fraction * num_clients + 0.5)))
    return num_clients


def poisson_sample(seed: int, round_idx: int, num_clients: int, rate: float) -> np.ndarray:
    """Sorted int32 ids of a Poisson sample: each client joins independently with probability
    ``rate`` (DP-FedAvg's sampling; the draw may be empty). Keyed on (seed, round) like
    ``sample_clients``, on a separate stream."""
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"Poisson sampling rate {rate} must be in (0, 1]")
    rng = np.random.default_rng([int(seed), int(round_idx), 1])
    return np.flatnonzero(rng.random(num_clients) < rate).astype(np.int32)


def sample_clients(
    seed: int,
    round_idx: int,
    num_clients: int,
    count: int | None = None,
    fraction: float | None = None,
) -> np.ndarray:
    """Sorted int32 ids of the clients taking part in ``round_idx`` (without replacement).

    The draw depends only on (seed, round_idx, num_clients, K), so a resumed run samples the same
    clients as an uninterrupted one.
    """
    k = num_sampled(num_clients, count, fraction)
    if k == num_clients:
        return np.arange(num_clients, dtype=np.int32)
    rng = np.random.default_rng([int(seed), int(round_idx)])
    return np.sort(rng.choice(num_clients, size=k, replace=False)).astype(np.int32)
