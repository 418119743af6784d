"""Centralised: one adapter trained on the pooled data of all clients (the upper-bound baseline).

Same step budget as a federated round: with K clients per round of E client steps each, the
pooled model takes K·E steps of the same batch size per round (``clients_per_round=K``), i.e.
the same number of examples seen. The engine feeds it batches from the union of the clients'
train splits and trains its single client every round; nothing is communicated. Its personal
model is the global one.
"""

from __future__ import annotations

import dataclasses

from fedlora_jax.algorithms.base import Algorithm, register
from fedlora_jax.algorithms.fedavg import all_shared, fedavg_family
from fedlora_jax.algorithms.training import ClientTraining


@dataclasses.dataclass(frozen=True)
class CentralizedOptions:
    clients_per_round: int = 1  # K: the pooled model takes K × client steps per round

    def __post_init__(self) -> None:
        if self.clients_per_round < 1:
            raise ValueError(
                f"algorithm.options.clients_per_round={self.clients_per_round} must be >= 1"
            )


@register("centralized", CentralizedOptions)
def centralized(training: ClientTraining, options: CentralizedOptions) -> Algorithm:
    """FedIT's update on one pooled client for ``clients_per_round × local_steps`` steps."""
    steps = options.clients_per_round * training.local_steps
    pooled = dataclasses.replace(training, local_steps=steps)
    return fedavg_family("centralized", pooled, all_shared(training), pooled_data=True)
