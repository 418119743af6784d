"""FedAvgM (Hsu et al. 2019): FedAvg whose server applies SGD with momentum to the mean
pseudo-gradient. Momentum 0 and server lr 1 is FedIT (up to float rounding)."""

from __future__ import annotations

import dataclasses

import optax

from fedlora_jax.algorithms.base import Algorithm, register
from fedlora_jax.algorithms.fedavg import all_shared, fedavg_family
from fedlora_jax.algorithms.training import ClientTraining


@dataclasses.dataclass(frozen=True)
class FedAvgMOptions:
    server_lr: float = 1.0
    momentum: float = 0.9


@register("fedavgm", FedAvgMOptions)
def fedavgm(training: ClientTraining, options: FedAvgMOptions) -> Algorithm:
    sgd = optax.sgd(options.server_lr, momentum=options.momentum or None)
    return fedavg_family("fedavgm", training, all_shared(training), server_optimizer=sgd)
