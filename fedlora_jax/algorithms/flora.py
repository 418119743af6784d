"""FLoRA (Wang et al., NeurIPS 2024, "FLoRA: federated fine-tuning large language models with
heterogeneous low-rank adaptations").

The server stacks the clients' factors instead of averaging them: B_s = [p_1 B_1 | ... | p_K B_K]
[out, Σ r_k] and A_s = [A_1; ...; A_K] [Σ r_k, in], so that

    B_s A_s = Σ_k p_k B_k A_k          exactly, for any client ranks r_k,

and merges it into the base weight the server owns (``base_delta``, placement ``server``):
W0 ← W0 + s·B_s A_s (s = α / r_max). Every client then starts the next round from a fresh LoRA.
Clients upload A_k, B_k at their rank; download the base delta (dense [in, out]: what we
broadcast and count; the paper sends the stacked factors and each client merges them into its
own copy of W0) and the fresh A, B.

Our choices: the fresh LoRA is PEFT's init (A Kaiming-uniform, B = 0, so the global ΔW is the
base delta exactly) drawn by the server from its key of the round just aggregated
(``RoundInfo.key``; module keys as ``init_adapters``), the same for every client (truncated to
each client's rank); p_k are the data-size weights (the paper's), applied to B.
"""

from __future__ import annotations

import dataclasses

from fedlora_jax.adapters import init_adapters
from fedlora_jax.algorithms.base import Algorithm, register, require_kind, select_placed
from fedlora_jax.algorithms.fedavg import fedavg_family
from fedlora_jax.algorithms.fedex_lora import (
    PLACEMENT,
    fold,
    map_modules,
    stacked_product,
    with_base_delta,
)
from fedlora_jax.algorithms.rank_mask import RankOptions, ranked
from fedlora_jax.algorithms.training import ClientTraining


@dataclasses.dataclass(frozen=True)
class FLoRAOptions(RankOptions):
    pass


@register("flora", FLoRAOptions)
def flora(training: ClientTraining, options: FLoRAOptions) -> Algorithm:
    require_kind("flora", training, ("lora",))
    merge = fold(training.adapter.scale, lambda new, up, w: stacked_product(up["A"], up["B"], w))

    def finalize(params, uploads, weights, info):
        merged = merge(params, uploads, weights, info)
        fresh = select_placed(init_adapters(info.key, training.model, training.adapter),
                              PLACEMENT, "shared")  # fmt: skip
        return map_modules(lambda m, f: {**m, **f}, merged, fresh)

    alg = fedavg_family(
        "flora", training, PLACEMENT, init_params=with_base_delta(training), finalize=finalize
    )
    return ranked(alg, training.adapter.r, options)
