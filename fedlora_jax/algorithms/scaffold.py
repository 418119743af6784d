"""SCAFFOLD (Karimireddy et al. 2020): FedAvg with server and client control variates c, c_i
that correct the client drift (option II of the paper's Algorithm 1).

Client i, K client steps at lr η_l from the global x::

    y ← y − η_l·(g_i(y) − c_i + c)                      (each step's gradient corrected)
    c_i⁺ = c_i − c + (x − y) / (K·η_l)                   (option II)
    uploads Δy_i = y − x (as y) and Δc_i = c_i⁺ − c_i

Server, S the valid sampled clients of N::

    x ← x + η_g·mean_{i∈S}(Δy_i)        c ← c + |S|/N · mean_{i∈S}(Δc_i)

Downlink: x and c; uplink: y and Δc_i — both variates are sent and counted, so SCAFFOLD costs
twice FedIT's bytes each way. The family's ``control_variates`` hook implements it.

Our choices where the paper is silent or assumes SGD: the corrected gradient goes through the
client optimizer the run configures (gradient clipping, then AdamW), so (x − y)/(K·η_l) is the
mean step scaled back by the peak lr, not the mean gradient it is under plain SGD; η_l is
``optimizer.lr`` (a warmup or decay schedule is not integrated); mean(Δy_i) is the data-weighted
mean like every FedAvg-family method (the paper's is uniform); mean(Δc_i) is uniform, as in the
paper. ``server_lr`` η_g = 1 is the plain mean of models (no server optimizer).
"""

from __future__ import annotations

import dataclasses

import optax

from fedlora_jax.algorithms.base import Algorithm, register
from fedlora_jax.algorithms.fedavg import all_shared, fedavg_family
from fedlora_jax.algorithms.training import ClientTraining


@dataclasses.dataclass(frozen=True)
class ScaffoldOptions:
    server_lr: float = 1.0  # η_g

    def __post_init__(self) -> None:
        if self.server_lr <= 0:
            raise ValueError(f"algorithm.options.server_lr={self.server_lr} must be > 0")


@register("scaffold", ScaffoldOptions)
def scaffold(training: ClientTraining, options: ScaffoldOptions) -> Algorithm:
    server = None if options.server_lr == 1.0 else optax.sgd(options.server_lr)
    return fedavg_family(
        "scaffold",
        training,
        all_shared(training),
        server_optimizer=server,
        control_variates=True,
    )
