"""Federated algorithms, one module each; importing this package registers them."""

from fedlora_jax.algorithms.base import Algorithm, ClientTraining, Phase, get, names, register

__all__ = ["Algorithm", "ClientTraining", "Phase", "get", "names", "register"]
