"""FedSA-LoRA (Guo et al. 2025, "Selective aggregation for LoRA in federated learning").

A learns general knowledge and is shared (FedAvg); B learns client-specific knowledge and stays
on the client (placement ``personal``). Personal model = global A + the client's own B.

Our choice for the *global* model (the paper evaluates personal models only): global A + the
data-weighted mean of the clients' B, weighted by each client's latest aggregation weight (data
size); uniform before any aggregation. It is an evaluation construct: the protocol itself never
uploads B (``fedavg.fedavg_family``'s models).
"""

from __future__ import annotations

from fedlora_jax.algorithms.base import Algorithm, NoOptions, register, require_kind
from fedlora_jax.algorithms.fedavg import fedavg_family
from fedlora_jax.algorithms.training import ClientTraining

PLACEMENT = {"A": "shared", "B": "personal"}


@register("fedsa_lora")
def fedsa_lora(training: ClientTraining, options: NoOptions) -> Algorithm:
    require_kind("fedsa_lora", training, ("lora",))
    return fedavg_family("fedsa_lora", training, PLACEMENT)
