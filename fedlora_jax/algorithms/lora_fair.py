"""LoRA-FAIR (Bian et al., ICCV 2025, "LoRA-FAIR: federated LoRA fine-tuning with aggregation
and initialization refinement").

FedIT's averaged factors do not multiply to the average update. LoRA-FAIR keeps Ā, corrects B̄
by a server-side residual ΔB, and the clients start the next round from (Ā, B̄ + ΔB) — the
paper's "Avg-Initial" refinement: no re-initialisation, no change to the base weight::

    Ā = Σ p_k A_k,   B̄ = Σ p_k B_k,   ΔW = Σ p_k B_k A_k
    ΔB = argmin_X ‖ΔW − (B̄ + X) Ā‖²_F + λ ‖X‖²_F = (ΔW − B̄Ā) Āᵀ (ĀĀᵀ + λI)⁺
    A ← Ā,   B ← B̄ + ΔB

p_k are the data-size weights (0 for an excluded client). Uploads A_k, B_k; downloads A, B:
FedIT's bytes. (ΔW − B̄Ā)Āᵀ = Σ p_k B_k (A_k Āᵀ) − B̄ (ĀĀᵀ) is formed from r×r products, never
the [out, in] ΔW.

Our choices: the paper (as a published summary of it reports; we did not read its equations)
measures the mismatch with a cosine-similarity loss S and finds ΔB by SGD on the server, with
λ‖ΔB‖ (λ = 0.01); we minimise the squared Frobenius mismatch with
λ‖ΔB‖²_F, whose minimiser is closed-form (exact and deterministic, no server step size or
iteration count; a cosine loss would also leave the scale of (B̄ + ΔB)Ā free). ``lam`` is λ;
λ = 0 gives the minimum-norm least-squares ΔB (the pseudo-inverse). With
``federated.client_ranks`` the factors are zero-padded to r_max (our extension; the paper uses
one rank) and each client starts from A, B truncated to its rank.
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


@dataclasses.dataclass(frozen=True)
class LoRAFAIROptions(RankOptions):
    lam: float = 0.01  # λ: weight of ‖ΔB‖²_F (keeps B̄ + ΔB near B̄, the next round's start)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lam < 0:
            raise ValueError(f"lam={self.lam} must be >= 0")


def residual_correction(
    A_bar: Array, B_bar: Array, A: Array, B: Array, weights: Array, lam: float
) -> Array:
    """ΔB [out, r] minimising ‖Σ_k p_k B_k A_k − (B̄ + ΔB) Ā‖²_F + λ‖ΔB‖²_F. A [K, r, in],
    B [K, out, r]; weight-0 rows ignored (they may hold NaN)."""
    p = normalise_weights(weights)
    keep = (p > 0)[:, None, None]
    A = jnp.where(keep, A, 0.0).astype(jnp.float32)
    B = jnp.where(keep, B, 0.0).astype(jnp.float32) * p[:, None, None]
    A_bar, B_bar = A_bar.astype(jnp.float32), B_bar.astype(jnp.float32)
    gram = A_bar @ A_bar.T  # [r, r]
    rhs = jnp.einsum("kor,krs->os", B, A @ A_bar.T) - B_bar @ gram  # (ΔW − B̄Ā) Āᵀ
    eye = jnp.eye(gram.shape[0], dtype=jnp.float32)
    return rhs @ jnp.linalg.pinv(gram + lam * eye, hermitian=True)


@register("lora_fair", LoRAFAIROptions)
def lora_fair(training: ClientTraining, options: LoRAFAIROptions) -> Algorithm:
    require_kind("lora_fair", training, ("lora",))

    def finalize(params, uploads, weights, info):
        def one(new, up):
            delta = residual_correction(new["A"], new["B"], up["A"], up["B"], weights, options.lam)
            return {**new, "B": (new["B"] + delta).astype(new["B"].dtype)}

        return map_modules(one, params, uploads)

    alg = fedavg_family("lora_fair", training, all_shared(training), finalize=finalize)
    return ranked(alg, training.adapter.r, options)
