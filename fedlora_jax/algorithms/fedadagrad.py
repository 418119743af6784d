"""FedAdagrad (Reddi et al. 2021, "Adaptive federated optimization"): FedAvg whose server applies
Adagrad to the mean pseudo-gradient.

Algorithm 2 of the paper, with Δ = mean_k(x_k) − x::

    m ← β1·m + (1 − β1)·Δ          v ← v + Δ²          x ← x + η·m / (√v + τ)

``paper_literal=True`` is exactly that (m₋₁ = 0, v₋₁ = τ², shared with FedYogi:
``fedyogi.reddi_algorithm2``). The default is ``optax.adagrad`` on g = −Δ, which differs: it has
no momentum (so ``b1`` must be 0 there), starts the sum of squares at 0 and puts ``tau`` inside the
square root (x ← x − η·g/√(v + τ)); the direction is the paper's, as v only sees squares.
"""

from __future__ import annotations

import dataclasses

import optax

from fedlora_jax.algorithms.base import Algorithm, register
from fedlora_jax.algorithms.fedavg import all_shared, fedavg_family
from fedlora_jax.algorithms.fedyogi import reddi_algorithm2
from fedlora_jax.algorithms.training import ClientTraining


@dataclasses.dataclass(frozen=True)
class FedAdagradOptions:
    server_lr: float = 1e-2  # η
    b1: float = 0.0  # the paper's momentum on Δ; paper_literal only (optax.adagrad has none)
    tau: float = 1e-3  # the paper's adaptivity τ (optax's eps)
    paper_literal: bool = False  # Algorithm 2 verbatim (momentum b1, v₋₁ = τ², τ outside √)

    def __post_init__(self) -> None:
        if not 0 <= self.b1 < 1 or self.tau <= 0 or self.server_lr <= 0:
            raise ValueError("algorithm.options: need 0 <= b1 < 1, tau > 0, server_lr > 0")
        if self.b1 and not self.paper_literal:
            raise ValueError(
                f"algorithm.options.b1={self.b1} needs paper_literal=True (optax.adagrad has no "
                "momentum)"
            )


@register("fedadagrad", FedAdagradOptions)
def fedadagrad(training: ClientTraining, options: FedAdagradOptions) -> Algorithm:
    o = options
    if o.paper_literal:
        server = reddi_algorithm2("adagrad", o.server_lr, o.b1, 0.0, o.tau)
    else:
        server = optax.adagrad(o.server_lr, initial_accumulator_value=0.0, eps=o.tau)
    return fedavg_family("fedadagrad", training, all_shared(training), server_optimizer=server)
