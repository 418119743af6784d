"""FFA-LoRA (Sun et al. 2024, "Improving LoRA in privacy-preserving federated learning").

A is drawn from a shared seed and never trained (placement ``frozen``), so it is identical on
every client; only B is trained and FedAvg-ed. The server sends the seed (8 bytes) and B; each
client regenerates A from the seed, so A never crosses the network. Gradients are taken w.r.t.
B only (A is a constant of the loss). Personal model = global.
"""

from __future__ import annotations

from fedlora_jax.algorithms.base import Algorithm, NoOptions, register, require_kind
from fedlora_jax.algorithms.fedavg import fedavg_family
from fedlora_jax.algorithms.training import ClientTraining

PLACEMENT = {"A": "frozen", "B": "shared"}


@register("ffa_lora")
def ffa_lora(training: ClientTraining, options: NoOptions) -> Algorithm:
    require_kind("ffa_lora", training, ("lora",))
    return fedavg_family("ffa_lora", training, PLACEMENT)
