"""Local-only: every client trains its own adapter on its own data; nothing is communicated.

Every adapter array is ``personal``; all clients start from the same initial adapter (same key).
There is no global model.
"""

from __future__ import annotations

from fedlora_jax.algorithms.base import Algorithm, NoOptions, register
from fedlora_jax.algorithms.fedavg import fedavg_family, leaf_keys
from fedlora_jax.algorithms.training import ClientTraining


@register("local_only")
def local_only(training: ClientTraining, options: NoOptions) -> Algorithm:
    return fedavg_family("local_only", training, dict.fromkeys(leaf_keys(training), "personal"))
