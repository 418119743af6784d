"""FlexLoRA (Bai et al., NeurIPS 2024, "Federated fine-tuning of large language models under
heterogeneous tasks and client resources").

Each client trains its LoRA at its own rank r_k and uploads it; the server forms the full-size
weighted update and redistributes its truncated SVD, each client receiving the leading r_k
components::

    ΔW_g = Σ_k p_k B_k A_k = U Σ Vᵀ
    B = U[:, :r] Σ[:r]^β,   A = Σ[:r]^(1−β) Vᵀ[:r]          (r = r_max, then truncated to r_k)

The server keeps the rank-r_max factors (the global model); the truncation to a client's rank is
the ``rank_mask`` wrapper's (the leading components of an SVD are its best rank-r_k
approximation). p_k are the data-size weights. Uploads: A_k, B_k at rank r_k; downloads: the
leading r_k components.

Our choices: the split of the singular values is the option ``sigma``: ``sqrt`` (β = ½, the
default), ``B`` (β = 1: A has orthonormal rows) or ``A`` (β = 0); we did not confirm the paper's
split in this session. The SVD is computed from the stacked factors (QR of [p_k B_k] and of
[A_k]ᵀ, then an SVD of the small core), never forming ΔW_g: exact and O((out + in)·(K r)²).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedlora_jax.algorithms.base import Algorithm, register, require_kind
from fedlora_jax.algorithms.fedavg import all_shared, fedavg_family
from fedlora_jax.algorithms.fedex_lora import map_modules
from fedlora_jax.algorithms.rank_mask import RankOptions, ranked
from fedlora_jax.algorithms.training import ClientTraining
from fedlora_jax.federated.aggregation import normalise_weights

Array = jax.Array
SPLITS = {"sqrt": 0.5, "B": 1.0, "A": 0.0}


@dataclasses.dataclass(frozen=True)
class FlexLoRAOptions(RankOptions):
    sigma: str = "sqrt"  # how Σ is split between B and A: sqrt | B | A

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sigma not in SPLITS:
            raise ValueError(f"sigma={self.sigma!r} is not allowed; allowed: {', '.join(SPLITS)}")


def truncated_svd_factors(A: Array, B: Array, weights: Array, r: int, beta: float):
    """(A [r, in], B [out, r]) with B A = the rank-r truncated SVD of Σ_k p_k B_k A_k, Σ split
    as Σ^β into B and Σ^(1−β) into A. A [K, r_k, in], B [K, out, r_k]; weight-0 rows ignored."""
    p = normalise_weights(weights)
    keep = (p > 0)[:, None, None]
    A = jnp.where(keep, A, 0.0).astype(jnp.float32)
    B = jnp.where(keep, B, 0.0).astype(jnp.float32) * p[:, None, None]
    k, rk, n_in = A.shape
    B_s = jnp.moveaxis(B, 0, 1).reshape(B.shape[1], k * rk)  # [out, K r]
    A_s = A.reshape(k * rk, n_in)  # [K r, in]
    q_b, r_b = jnp.linalg.qr(B_s)
    q_a, r_a = jnp.linalg.qr(A_s.T)
    u, s, vt = jnp.linalg.svd(r_b @ r_a.T, full_matrices=False)
    U, V = (q_b @ u)[:, :r], (q_a @ vt.T)[:, :r]
    s = s[:r]
    return (s ** (1.0 - beta))[:, None] * V.T, U * s**beta


@register("flexlora", FlexLoRAOptions)
def flexlora(training: ClientTraining, options: FlexLoRAOptions) -> Algorithm:
    require_kind("flexlora", training, ("lora",))
    r, beta = training.adapter.r, SPLITS[options.sigma]

    def finalize(params, uploads, weights, info):
        def one(new, up):
            A, B = truncated_svd_factors(up["A"], up["B"], weights, r, beta)
            return {**new, "A": A.astype(new["A"].dtype), "B": B.astype(new["B"].dtype)}

        return map_modules(one, params, uploads)

    alg = fedavg_family("flexlora", training, all_shared(training), finalize=finalize)
    return ranked(alg, r, options)
