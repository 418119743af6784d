"""Federated algorithms, one module each; importing this package registers them.

To add a built-in algorithm, add its module to the import list below (one name per line).
"""

from fedlora_jax.algorithms import (  # noqa: F401 (imports register the builders)
    centralized,
    fedalt,
    fedgalore,
    fedit,
    fedlora_optimizer,
    fedsa_lora,
    ffa_lora,
    local_only,
)
from fedlora_jax.algorithms.base import Algorithm, ClientTraining, Phase, get, names, register

__all__ = ["Algorithm", "ClientTraining", "Phase", "get", "names", "register"]
