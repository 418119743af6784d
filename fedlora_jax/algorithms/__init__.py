"""Federated algorithms, one module each; importing this package registers them.

To add a built-in algorithm, add its module to the import list below (one name per line).
"""

from fedlora_jax.algorithms import (  # noqa: F401 (imports register the builders)
    centralized,
    fedadam,
    fedalt,
    fedavgm,
    fedgalore,
    fedit,
    fedlora_optimizer,
    fedprox,
    fedsa_lora,
    ffa_lora,
    local_only,
)
from fedlora_jax.algorithms.base import (
    Algorithm,
    Models,
    Phase,
    RoundInfo,
    get,
    names,
    register,
)
from fedlora_jax.algorithms.training import ClientTraining

__all__ = [
    "Algorithm",
    "ClientTraining",
    "Models",
    "Phase",
    "RoundInfo",
    "get",
    "names",
    "register",
]
