"""FedYogi (Reddi et al. 2021, "Adaptive federated optimization"): FedAvg whose server applies
Yogi to the mean pseudo-gradient.

Algorithm 2 of the paper, with Δ = mean_k(x_k) − x (the data-weighted mean of the uploads)::

    m ← β1·m + (1 − β1)·Δ
    v ← v − (1 − β2)·Δ²·sign(v − Δ²)        (FedAdagrad: v ← v + Δ²; FedAdam: β2·v + (1−β2)·Δ²)
    x ← x + η·m / (√v + τ)

``paper_literal=True`` is exactly that: no bias correction, m starts at 0, v at τ². The default
(``paper_literal=False``) is ``optax.yogi`` on the pseudo-gradient g = −Δ, which differs in three
ways: it bias-corrects m and v (÷(1 − β^t)), starts both m and v at 1e-6, and descends on g
(x ← x − η·m̂(g)/(√v̂ + τ) — the same direction as the paper's ascent on Δ, since m is linear in
its input and v depends on it only through squares). ``tau`` is optax's ``eps`` (outside the
square root, as the paper's τ).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedlora_jax.algorithms.base import Algorithm, register
from fedlora_jax.algorithms.fedavg import all_shared, fedavg_family
from fedlora_jax.algorithms.training import ClientTraining

RULES = ("adagrad", "adam", "yogi")


class ReddiState(NamedTuple):
    m: Any
    v: Any


def _second_moment(rule: str, b2: float):
    if rule == "adagrad":
        return lambda v, d2: v + d2
    if rule == "adam":
        return lambda v, d2: b2 * v + (1 - b2) * d2
    return lambda v, d2: v - (1 - b2) * d2 * jnp.sign(v - d2)


def reddi_algorithm2(
    rule: str, server_lr: float, b1: float, b2: float, tau: float
) -> optax.GradientTransformation:
    """The paper's server step (Algorithm 2, no bias correction, v₋₁ = τ²) as an optax transform
    on the pseudo-gradient g = −Δ (so ``optax.apply_updates`` adds η·m/(√v + τ) in Δ's terms)."""
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not allowed; allowed: {', '.join(RULES)}")
    second = _second_moment(rule, b2)

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return ReddiState(zeros, jax.tree.map(lambda x: jnp.full_like(x, tau**2), params))

    def update(grads, state, params=None):
        delta = jax.tree.map(jnp.negative, grads)
        m = jax.tree.map(lambda m, d: b1 * m + (1 - b1) * d, state.m, delta)
        v = jax.tree.map(lambda v, d: second(v, jnp.square(d)), state.v, delta)
        updates = jax.tree.map(lambda m, v: server_lr * m / (jnp.sqrt(v) + tau), m, v)
        return updates, ReddiState(m, v)

    return optax.GradientTransformation(init, update)


@dataclasses.dataclass(frozen=True)
class FedYogiOptions:
    server_lr: float = 1e-2  # η
    b1: float = 0.9
    b2: float = 0.99
    tau: float = 1e-3  # the paper's adaptivity τ (optax's eps)
    paper_literal: bool = False  # Algorithm 2 verbatim (no bias correction, v₋₁ = τ²)

    def __post_init__(self) -> None:
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1) or self.tau <= 0 or self.server_lr <= 0:
            raise ValueError("algorithm.options: need 0 <= b1, b2 < 1, tau > 0, server_lr > 0")


@register("fedyogi", FedYogiOptions)
def fedyogi(training: ClientTraining, options: FedYogiOptions) -> Algorithm:
    o = options
    if o.paper_literal:
        server = reddi_algorithm2("yogi", o.server_lr, o.b1, o.b2, o.tau)
    else:
        server = optax.yogi(o.server_lr, b1=o.b1, b2=o.b2, eps=o.tau)
    return fedavg_family("fedyogi", training, all_shared(training), server_optimizer=server)
