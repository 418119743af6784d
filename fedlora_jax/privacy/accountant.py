"""Privacy accounting for DP-FedAvg with the ``dp-accounting`` library (RDP and PLD).

One round releases one noisy sum of clipped client updates: a subsampled Gaussian mechanism.

- Poisson sampling (rate q), add/remove-one-client neighbours: ``PoissonSampledDpEvent(q,
  GaussianDpEvent(z))`` with z = noise std / C (the sum's sensitivity is C).
- Fixed-size sampling (m of N without replacement): ``SampledWithoutReplacementDpEvent(N, m,
  GaussianDpEvent(z / 2))`` (Wang, Balle, Kasiviswanathan 2019), which the library accounts under
  replace-one neighbours only, where the sum's sensitivity is 2C: hence z / 2. RDP only (the PLD
  accountant does not support this event).

Adaptive clipping (Andrew et al. 2021) releases a second Gaussian (the clipped count) each round;
``update_noise_multiplier`` splits the accounted z into the update's and the count's noise so
that their composition is exactly one Gaussian of multiplier z (the paper's Theorem 1).
"""

from __future__ import annotations

import dataclasses
import math

import dp_accounting

ACCOUNTANTS = ("pld", "rdp")
SAMPLINGS = ("poisson", "fixed")


@dataclasses.dataclass(frozen=True)
class Mechanism:
    """What one round releases: ``noise_multiplier`` z (accounted; std / C), the sampling
    ``rate`` q (Poisson) or ``sample_size`` m of ``num_clients`` N (fixed), the accountant."""

    noise_multiplier: float
    sampling: str
    num_clients: int
    rate: float
    sample_size: int
    accountant: str = "pld"

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"dp.sampling={self.sampling!r} is not valid; allowed: poisson, fixed")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"dp.accountant={self.accountant!r} is not valid; allowed: pld, rdp")
        if self.sampling == "fixed" and self.accountant == "pld":
            raise ValueError(
                "dp.sampling='fixed' needs dp.accountant='rdp' (dp-accounting's PLD accountant "
                "has no event for sampling without replacement)"
            )


def round_event(m: Mechanism, noise_multiplier: float | None = None) -> dp_accounting.DpEvent:
    """The DpEvent of one round (``noise_multiplier`` overrides m's, for calibration)."""
    z = m.noise_multiplier if noise_multiplier is None else noise_multiplier
    if m.sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(m.rate, dp_accounting.GaussianDpEvent(z))
    return dp_accounting.SampledWithoutReplacementDpEvent(
        m.num_clients, m.sample_size, dp_accounting.GaussianDpEvent(z / 2)
    )


def fresh_accountant(m: Mechanism) -> dp_accounting.PrivacyAccountant:
    if m.accountant == "pld":
        return dp_accounting.pld.PLDAccountant()
    relation = dp_accounting.NeighboringRelation
    neighbours = relation.ADD_OR_REMOVE_ONE if m.sampling == "poisson" else relation.REPLACE_ONE
    return dp_accounting.rdp.RdpAccountant(neighboring_relation=neighbours)


def epsilon(
    m: Mechanism, rounds: int, delta: float, noise_multiplier: float | None = None
) -> float:
    """ε at ``delta`` after ``rounds`` rounds (0 for none; inf without noise)."""
    if rounds <= 0:
        return 0.0
    z = m.noise_multiplier if noise_multiplier is None else noise_multiplier
    if z <= 0:
        return math.inf
    acc = fresh_accountant(m)
    acc.compose(round_event(m, z), rounds)
    return float(acc.get_epsilon(delta))


def calibrate(m: Mechanism, rounds: int, target_epsilon: float, delta: float) -> float:
    """The smallest noise multiplier z (to 1e-4, rounded up) with ε(rounds) ≤ target_epsilon."""
    tol = 1e-4
    z = dp_accounting.calibrate_dp_mechanism(
        lambda: fresh_accountant(m),
        lambda z: dp_accounting.SelfComposedDpEvent(round_event(m, z), rounds),
        target_epsilon,
        delta,
        dp_accounting.ExplicitBracketInterval(0.3, 100.0),  # below 0.3 PLD is slow, ε huge,
        tol=tol,
    )
    z = float(z) + tol  # Brent's answer is within tol of the boundary, on either side
    assert epsilon(m, rounds, delta, z) <= target_epsilon, (z, target_epsilon)
    return z


def update_noise_multiplier(z: float, count_stddev: float) -> float:
    """Andrew et al. 2021: the update's noise multiplier σ_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) when the
    clipped count (sensitivity 1/2, centred) gets noise σ_b; the pair then costs exactly one
    Gaussian of multiplier z. Needs 2σ_b > z."""
    if 2 * count_stddev <= z:
        raise ValueError(
            f"dp.clipped_count_stddev={count_stddev} must exceed noise_multiplier / 2 = {z / 2:.4g}"
            " (adaptive clipping spends part of the budget on the clipped count)"
        )
    return (z**-2 - (2 * count_stddev) ** -2) ** -0.5
