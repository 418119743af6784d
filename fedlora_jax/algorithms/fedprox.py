"""FedProx (Li et al. 2020): FedAvg whose clients minimise loss + μ/2 ‖θ − θ_global‖²."""

import dataclasses

import jax
import jax.numpy as jnp

from fedlora_jax.algorithms.base import Algorithm, register
from fedlora_jax.algorithms.fedavg import all_shared, fedavg_family
from fedlora_jax.algorithms.training import ClientTraining


@dataclasses.dataclass(frozen=True)
class FedProxOptions:
    mu: float = 0.01  # proximal weight μ; 0 is FedIT

    def __post_init__(self) -> None:
        if self.mu < 0:
            raise ValueError(f"algorithm.options.mu={self.mu} must be >= 0")


@register("fedprox", FedProxOptions)
def fedprox(training: ClientTraining, options: FedProxOptions) -> Algorithm:
    def proximal(trained, received):  # both: the shared leaves (trained / this round's global)
        squares = jax.tree.map(lambda a, b: jnp.sum(jnp.square(a - b)), trained, received)
        return options.mu / 2 * sum(jax.tree.leaves(squares))

    return fedavg_family("fedprox", training, all_shared(training), client_penalty=proximal)
