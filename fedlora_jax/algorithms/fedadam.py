"""FedAdam (Reddi et al. 2021): FedAvg whose server applies Adam to the mean pseudo-gradient.

Our choice: optax's Adam, which bias-corrects its moments (the paper's Algorithm 2 does not);
``tau`` is Adam's ε, the paper's adaptivity τ.
"""

import dataclasses

import optax

from fedlora_jax.algorithms.base import Algorithm, register
from fedlora_jax.algorithms.fedavg import all_shared, fedavg_family
from fedlora_jax.algorithms.training import ClientTraining


@dataclasses.dataclass(frozen=True)
class FedAdamOptions:
    server_lr: float = 1e-2  # η
    b1: float = 0.9
    b2: float = 0.99
    tau: float = 1e-3


@register("fedadam", FedAdamOptions)
def fedadam(training: ClientTraining, options: FedAdamOptions) -> Algorithm:
    adam = optax.adam(options.server_lr, b1=options.b1, b2=options.b2, eps=options.tau)
    return fedavg_family("fedadam", training, all_shared(training), server_optimizer=adam)
