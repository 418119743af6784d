"""User-level central differential privacy for federated rounds (DP-FedAvg, docs/privacy.md):
clipping and Gaussian noise on the aggregation contract, accounting with ``dp-accounting``."""

from fedlora_jax.privacy.accountant import Mechanism, calibrate, epsilon
from fedlora_jax.privacy.mechanism import ClipState, clip_rows, clip_updates, gaussian_sum
from fedlora_jax.privacy.private import (
    DpSettings,
    PrivateAlgorithm,
    PrivateServer,
    privatise,
    refusal,
    settings,
)

__all__ = [
    "ClipState", "DpSettings", "Mechanism", "PrivateAlgorithm", "PrivateServer", "calibrate",
    "clip_rows", "clip_updates", "epsilon", "gaussian_sum", "privatise", "refusal", "settings",
]  # fmt: skip
