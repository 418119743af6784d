"""DP-FedAvg as a wrapper around any algorithm whose aggregation depends on the uploads only
through their mean: ``privatise(algorithm, settings)``.

A phase declares that property with ``Phase.upload_origin`` (server state -> the value each
client's upload starts from, i.e. what it received). The wrapper then turns the K uploads into
updates ``u_k − origin``, clips them (``mechanism.clip_updates``), releases the noisy mean
``origin + (Σ clipped + N(0, σ²C²)) / m`` and hands the phase's own ``aggregate`` that value in
every participating row, so the method's server step (the mean, FedAdam's optimizer, ...) is
post-processing of the one private release. A phase without ``upload_origin`` (FedALT keeps every
client's upload for its rest-of-world LoRA) is refused: central DP of a mean does not cover it.

An empty Poisson draw still releases ``origin + N(0, σ²C²) / m`` (``release_without_clients``):
releasing the unchanged model instead would tell whether anyone was sampled, which the
subsampled-Gaussian accounting does not allow for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from fedlora_jax.algorithms.base import Algorithm, replicate
from fedlora_jax.federated.context import RoundInfo
from fedlora_jax.federated.engine import SERVER_KEY
from fedlora_jax.federated.sampling import num_sampled
from fedlora_jax.privacy import accountant
from fedlora_jax.privacy.mechanism import ClipState, clip_updates, gaussian_sum
from fedlora_jax.settings import Section, setting

PyTree = Any
Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PrivacySettings(Section):
    """The ``dp`` section of a run config: user-level central DP (DP-FedAvg, docs/privacy.md)."""

    section = "dp"
    enabled: bool = setting(False, "train under DP-FedAvg")
    clip: float = setting(0.1, "per-client update clip norm C", low=0, inclusive=False)
    noise_multiplier: float = setting(
        0.0, "σ; 0 = calibrated to target_epsilon over federated.rounds", low=0
    )
    target_epsilon: float = setting(0.0, "the ε budget at delta; 0 = no budget", low=0)
    delta: float = setting(1e-5, "δ of the (ε, δ) guarantee, in (0, 1)", low=0, inclusive=False)
    sampling: str = setting(
        "poisson",
        "poisson = each client joins with q = client_fraction (or m/N); fixed = m per round",
        choices=("poisson", "fixed"),
    )
    accountant: str = setting("pld", "dp-accounting's accountant", choices=("pld", "rdp"))
    adaptive_clip: bool = setting(False, "adapt C to a quantile (Andrew et al. 2021)")
    target_quantile: float = setting(0.5, "adaptive clipping: the unclipped share, in (0, 1)")
    clip_learning_rate: float = setting(0.2, "adaptive clipping: C's learning rate", low=0)
    clipped_count_stddev: float = setting(
        0.0, "adaptive clipping: noise on the clipped count; 0 = expected clients / 20", low=0
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("delta", "target_quantile"):
            if not 0 < getattr(self, key) < 1:
                raise self.fail(key, "must be in (0, 1)")


@dataclasses.dataclass(frozen=True)
class DpSettings:
    """A resolved ``dp`` config section (σ calibrated when only a target ε was given)."""

    mechanism: accountant.Mechanism
    clip: float
    delta: float
    target_epsilon: float | None  # the budget: stop before a round that would exceed it
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    count_stddev: float = 0.0

    @property
    def noise_multiplier(self) -> float:
        """z, the accounted noise multiplier."""
        return self.mechanism.noise_multiplier

    @property
    def expected_clients(self) -> float:
        """m: the fixed denominator (qN under Poisson sampling)."""
        m = self.mechanism
        return m.rate * m.num_clients if m.sampling == "poisson" else float(m.sample_size)

    @property
    def update_noise_multiplier(self) -> float:
        """σ_Δ: the noise on the update (> z with adaptive clipping, Andrew et al. 2021)."""
        if not self.adaptive:
            return self.noise_multiplier
        return accountant.update_noise_multiplier(self.noise_multiplier, self.count_stddev)

    def epsilon(self, rounds: int) -> float:
        return accountant.epsilon(self.mechanism, rounds, self.delta)


def settings(
    dp: PrivacySettings,
    num_clients: int,
    rounds: int,
    clients_per_round: int | None = None,
    client_fraction: float | None = None,
) -> DpSettings:
    """DpSettings from a ``dp`` section: q (Poisson) or m (fixed) from the federated sampling
    keys (all clients when neither is set); σ calibrated to ``target_epsilon`` over ``rounds``
    when ``noise_multiplier`` is 0. ValueError (one line) for an impossible combination."""
    m = num_sampled(num_clients, clients_per_round, client_fraction)
    rate = client_fraction or m / num_clients
    z, target = dp.noise_multiplier, dp.target_epsilon or None
    if z <= 0 and target is None:
        raise ValueError(
            "dp.enabled needs dp.noise_multiplier > 0 or dp.target_epsilon > 0 (σ is then "
            "calibrated to it over federated.rounds)"
        )
    mech = accountant.Mechanism(z, dp.sampling, num_clients, rate, m, dp.accountant)
    if z <= 0:
        z = accountant.calibrate(mech, rounds, target, dp.delta)
        mech = dataclasses.replace(mech, noise_multiplier=z)
    expected = rate * num_clients if mech.sampling == "poisson" else m
    out = DpSettings(
        mech, dp.clip, dp.delta, target, dp.adaptive_clip, dp.target_quantile,
        dp.clip_learning_rate, dp.clipped_count_stddev or expected / 20,  # Andrew et al.'s default
    )  # fmt: skip
    _ = out.update_noise_multiplier  # checks the adaptive split is possible
    return out


@struct.dataclass
class PrivateServer:
    """The wrapped algorithm's server state and the clipping state."""

    inner: PyTree
    clip: ClipState


@dataclasses.dataclass(frozen=True, eq=False)
class PrivateAlgorithm(Algorithm):
    """An Algorithm whose one aggregating phase releases the DP-FedAvg mean.
    ``release_without_clients(server, rng, round, total_rounds, N)`` is the engine's step for an
    empty Poisson draw."""

    release_without_clients: Callable[..., PyTree] | None = None
    privacy: DpSettings | None = None


def refusal(algorithm: Algorithm) -> str | None:
    """Why central DP of a mean cannot cover ``algorithm`` (one line), or None."""
    if algorithm.pooled_data:
        return f"{algorithm.name} pools all clients' data in one place: no client-level release"
    aggregating = [p for p in algorithm.phases if p.aggregate is not None]
    if not aggregating:
        return f"{algorithm.name} uploads nothing: there is no release for central DP to protect"
    if len(aggregating) > 1:
        return f"{algorithm.name} aggregates in {len(aggregating)} phases; DP-FedAvg covers one"
    phase = aggregating[0]
    if phase.upload_origin is None:
        return (
            f"{algorithm.name}'s server uses each client's upload on its own (phase {phase.name!r} "
            "declares no upload_origin), so central DP of their mean does not cover it"
        )
    return None


def privatise(algorithm: Algorithm, dp: DpSettings) -> PrivateAlgorithm:
    """``algorithm`` with its aggregating phase made DP-FedAvg; ValueError (one line) when
    ``refusal`` says it cannot be."""
    reason = refusal(algorithm)
    if reason:
        raise ValueError(f"dp.enabled: refused: {reason}")
    p = next(i for i, ph in enumerate(algorithm.phases) if ph.aggregate is not None)
    phase = algorithm.phases[p]
    transform = clip_updates(
        dp.clip, adaptive=dp.adaptive, target_quantile=dp.target_quantile,
        learning_rate=dp.clip_learning_rate, count_stddev=dp.count_stddev,
        expected_clients=dp.expected_clients,
    )  # fmt: skip
    z_update = dp.update_noise_multiplier

    def release(server: PrivateServer, uploads, weights, info) -> tuple[PyTree, ClipState]:
        """origin + (Σ clipped updates + N(0, σ_Δ²C²)) / m, and the new clipping state."""
        origin = phase.upload_origin(server.inner)
        updates = jax.vmap(lambda u: jax.tree.map(jnp.subtract, u, origin))(uploads)
        clipped, ones, clip = transform.update(updates, weights, server.clip, info)
        mean = gaussian_sum(z_update * clip.used, dp.expected_clients)(clipped, ones, info.key)
        return jax.tree.map(jnp.add, origin, mean), clip

    def aggregate(server: PrivateServer, uploads, weights, client_ids, info) -> PrivateServer:
        value, clip = release(server, uploads, weights, info)
        rows = replicate(value, weights.shape[0])  # every row the release: its mean is the release
        return PrivateServer(phase.aggregate(server.inner, rows, weights, client_ids, info), clip)

    def unwrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        return lambda server, *rest: fn(server.inner, *rest)

    phases = tuple(
        dataclasses.replace(ph, broadcast=unwrap(ph.broadcast), aggregate=aggregate)
        if i == p
        else dataclasses.replace(ph, broadcast=unwrap(ph.broadcast))
        for i, ph in enumerate(algorithm.phases)
    )

    def init(key: Array, base: PyTree, n: int) -> tuple[PrivateServer, PyTree]:
        server, clients = algorithm.init(key, base, n)
        return PrivateServer(server, transform.init(None)), clients

    @jax.jit
    def empty(server: PrivateServer, info: RoundInfo) -> PrivateServer:
        origin = phase.upload_origin(server.inner)
        value, clip = release(server, replicate(origin, 1), jnp.zeros((1,), jnp.float32), info)
        ghost = jnp.array([info.num_clients], jnp.int32)  # out of range: scatters drop it
        rows, one = replicate(value, 1), jnp.ones((1,), jnp.float32)
        return PrivateServer(phase.aggregate(server.inner, rows, one, ghost, info), clip)

    def release_without_clients(server, rng, round_idx, total_rounds, n):
        key = jax.random.fold_in(jax.random.fold_in(rng, round_idx), p)
        info = RoundInfo(jnp.int32(round_idx), jax.random.fold_in(key, SERVER_KEY), total_rounds, n)
        return empty(server, info)

    return PrivateAlgorithm(
        algorithm.name, init, phases, unwrap(algorithm.models), algorithm.pooled_data,
        None if algorithm.cache_key is None else ("dp", algorithm.cache_key, dp),
        release_without_clients, dp,
    )  # fmt: skip
