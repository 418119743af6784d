"""FedIT (Zhang et al. 2024, "Towards building the federated GPT"): FedAvg of LoRA A and B.

Clients start each round from the global adapter, train every adapter array, upload it; the
server takes the data-weighted mean. Personal model = the global one. Works for any adapter
kind whose arrays are all shared (lora, decomposed).
"""

from __future__ import annotations

from fedlora_jax.algorithms.base import Algorithm, NoOptions, register
from fedlora_jax.algorithms.fedavg import all_shared, fedavg_family
from fedlora_jax.algorithms.training import ClientTraining


@register("fedit")
def fedit(training: ClientTraining, options: NoOptions) -> Algorithm:
    return fedavg_family("fedit", training, all_shared(training))
