"""Centralised: one adapter trained on the pooled data of all clients (the upper-bound baseline).

Same step budget as a federated round: with K clients per round of E local steps each, the pooled
model takes K·E steps of the same batch size per round (``clients_per_round=K``), i.e. the same
number of examples seen. The engine feeds it batches from the union of the clients' train splits
and trains its single client every round; nothing is communicated. It has no personal model
(``models`` returns personal None: evaluate the global adapter on every client's test split).
"""

from __future__ import annotations

import dataclasses

from fedlora_jax.algorithms.base import Algorithm, ClientTraining, register
from fedlora_jax.algorithms.fedit import fedit


@register("centralized")
def centralized(training: ClientTraining, clients_per_round: int = 1) -> Algorithm:
    """FedIT's update on one pooled client for ``clients_per_round × local_steps`` steps."""
    if clients_per_round < 1:
        raise ValueError(f"algorithm.clients_per_round={clients_per_round} must be >= 1")
    pooled = dataclasses.replace(training, local_steps=clients_per_round * training.local_steps)
    inner = fedit(pooled)
    return dataclasses.replace(
        inner,
        name="centralized",
        pooled_data=True,
        models=lambda server, client_states: (server["adapters"], None),
    )
