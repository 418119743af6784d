"""Federated algorithms, one module each; importing this package registers them.

To add a built-in algorithm, add its module to the import list below (one name per line).
"""

from fedlora_jax.algorithms import (  # noqa: F401 (imports register the builders)
    centralized,
    ditto,
    fedadagrad,
    fedadam,
    fedalt,
    fedavgm,
    feddpa,
    fedex_lora,
    fedgalore,
    fedit,
    fedlora_optimizer,
    fedprox,
    fedsa_lora,
    fedyogi,
    ffa_lora,
    flexlora,
    flora,
    hetlora,
    local_only,
    lora_fair,
    rolora,
    scaffold,
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
