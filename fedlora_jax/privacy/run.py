"""The run loop's side of DP (``runner``): wrap the algorithm and the sampling, report ε and the
clip fraction each round, and stop before a round that would exceed the budget."""

from __future__ import annotations

import dataclasses

import jax
from ml_collections import ConfigDict

from fedlora_jax.algorithms.base import Algorithm
from fedlora_jax.federated.engine import EngineConfig, EngineState
from fedlora_jax.privacy.private import (
    DpSettings,
    PrivacySettings,
    PrivateAlgorithm,
    privatise,
    settings,
)


def for_run(
    dp: PrivacySettings, algorithm: Algorithm, engine: EngineConfig, num_clients: int
) -> tuple[PrivateAlgorithm, EngineConfig, DpSettings]:
    """(private algorithm, engine config with Poisson sampling when asked, settings). σ is
    calibrated over ``engine.rounds`` when only ``dp.target_epsilon`` is set."""
    got = settings(
        dp, num_clients, engine.rounds or 1, engine.clients_per_round, engine.client_fraction
    )
    if got.mechanism.sampling == "poisson":
        engine = dataclasses.replace(
            engine, sampling_rate=got.mechanism.rate, clients_per_round=None, client_fraction=None
        )
    return privatise(algorithm, got), engine, got


def round_metrics(dp: DpSettings, state: EngineState) -> dict[str, float]:
    """``dp/epsilon`` after the rounds done, and last round's clip norm, clip fraction (exact:
    a diagnostic outside the guarantee) and, with adaptive clipping, the noisy unclipped share."""
    clip = jax.device_get(state.server_state.clip)
    row = {
        "dp/epsilon": dp.epsilon(state.round),
        "dp/delta": dp.delta,
        "dp/noise_multiplier": dp.noise_multiplier,
        "dp/clip": float(clip.used),
        "dp/clip_fraction": float(clip.fraction),
    }
    if dp.adaptive:
        row["dp/noisy_unclipped"] = float(clip.noisy_unclipped)
    return row


def budget_stop(dp: DpSettings | None, rounds_done: int) -> str | None:
    """Why the next round may not run (its ε would exceed ``dp.target_epsilon``), or None."""
    if dp is None or dp.target_epsilon is None:
        return None
    nxt = dp.epsilon(rounds_done + 1)
    if nxt <= dp.target_epsilon:
        return None
    return (
        f"privacy budget spent: round {rounds_done + 1} would reach ε = {nxt:.4g} > "
        f"dp.target_epsilon = {dp.target_epsilon:g} at δ = {dp.delta:g} "
        f"(ε after {rounds_done} rounds: {dp.epsilon(rounds_done):.4g})"
    )


def private_preset(cfg: ConfigDict, target_epsilon: float = 8.0) -> ConfigDict:
    """The datasets' ``dp`` presets: FedIT (every client's model is the global one, so nothing
    personal escapes the guarantee's scope unnoticed) under DP-FedAvg with ε = target at δ = 1e-5
    over federated.rounds, C = 1 (Adam's first steps move every LoRA entry by about lr, so an
    update's norm is about steps·lr·sqrt(#entries): ~2.7 for SmolLM2 r=8 q,v at 2e-3 x 2 steps),
    Poisson sampling at the federated rate."""
    cfg.algorithm.name = "fedit"
    cfg.dp.update(enabled=True, clip=1.0, target_epsilon=target_epsilon, delta=1e-5)
    return cfg
