"""FedDPA (Yang et al., NeurIPS 2024, "Dual-personalizing adapter for federated foundation
models"; released code ``Lydia-yang/FedDPA``), the FedDPA-F variant.

Every client holds a global adapter θ_g (LoRA A, B), trained FedAvg-style and aggregated, and a
local adapter θ_l (A_l, B_l) that never leaves it. FedDPA-F learns them sequentially: the local
adapter is initialised from the global one and fine-tuned on the client's data. A round here is
FedIT's round followed by that fine-tuning, so after any round the personal model is what
FedDPA-F would produce if training stopped there:

    global phase:    θ_g,k ← θ_g after local_steps steps on client k's data;  θ_g ← Σ p_k θ_g,k
    finetune phase:  θ_l,k ← θ_g (just aggregated), then finetune_steps steps on client k's data

At test time the two are combined per instance (adapter kind ``dual``; the eval harness calls
its ``condition``): y = W0 x + α(x)·ΔW_g x + (1 − α(x))·ΔW_l x with
α(x) = w · mean_j cos(e(x), e(x_j)), e the last prompt token's final hidden state under the local
adapter alone and x_j ``instances`` training prompts of the client (the anchors, taken from the
finetune phase's rows and stored, as representations, in the client state).

Our choices where the paper (as far as we could read it) and the released code are silent:
- α weights the GLOBAL adapter and 1 − α the local one, as the released inference script does
  (``GlobalModel_generated.py``: the active "default" = global adapter gets the weight); w is
  ``max_weight`` (the script's ``--max_weight 0.5``).
- The anchors are the first ``instances`` rows of the finetune phase's batches (one instance per
  row: the first packed example), fixed until the client's next finetune phase, instead of 5 fresh
  random training instructions per test instance; fewer rows than ``instances`` means fewer
  anchors (the finetune phase reports ``anchors``, the number used).
- The global phase is FedIT's, bitwise (same init, same reduction); the finetune phase's step budget
  is extra (FedDPA-F's fine-tuning follows the federated training) and its optimizer is always a
  fresh AdamW (the local adapter restarts from θ_g every round).
- A client that has not yet run a finetune phase has θ_l = the initial adapter and no anchor
  (α = 0: its local adapter alone).
FedDPA-T (iterative: the local adapter trained alongside the frozen global one every round) is
not implemented.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from fedlora_jax.adapters.dual import ANCHORS, GLOBAL_KEYS, LOCAL_KEYS, with_mix
from fedlora_jax.algorithms.base import (
    Algorithm,
    Models,
    Phase,
    merge_trees,
    placement_labels,
    register,
    replicate,
    require_kind,
)
from fedlora_jax.algorithms.fedavg import ClientState, all_shared, fedavg_family
from fedlora_jax.algorithms.training import (
    ClientTraining,
    local_train,
    make_loss_fn,
    make_optimizer,
)
from fedlora_jax.model.llama import hidden

Array = jax.Array
Tree = dict[str, Any]
TO_LOCAL = dict(zip(GLOBAL_KEYS, LOCAL_KEYS, strict=True))
LOCAL_PLACEMENT = dict.fromkeys(LOCAL_KEYS, "personal")


@dataclasses.dataclass(frozen=True)
class FedDPAOptions:
    finetune_steps: int | None = None  # local-adapter fine-tuning steps a round; None: local_steps
    instances: int = 5  # anchors: training instances whose representations give α
    max_weight: float = 0.5  # w in α = w · mean cos

    def __post_init__(self) -> None:
        if self.finetune_steps is not None and self.finetune_steps < 1:
            raise ValueError(f"algorithm.options.finetune_steps={self.finetune_steps} must be >= 1")
        if self.instances < 1:
            raise ValueError(f"algorithm.options.instances={self.instances} must be >= 1")
        if not 0.0 <= self.max_weight <= 1.0:
            raise ValueError(f"algorithm.options.max_weight={self.max_weight} must be in [0, 1]")


@struct.dataclass
class FedDPAClient:
    """Rows for N clients: the global phase's family state, the local adapter θ_l (LoRA
    layout ``A, B``) and the anchors' representations [instances, d] with their validity."""

    fedavg: ClientState
    local: Tree
    anchors: Array
    valid: Array


def rename_keys(tree: Tree, mapping: Mapping[str, str]) -> Tree:
    """The same module tree with leaf keys renamed (``A`` → ``A_l``)."""
    if any(hasattr(v, "shape") for v in tree.values()):
        return {mapping.get(k, k): v for k, v in tree.items()}
    return {name: rename_keys(sub, mapping) for name, sub in tree.items()}


def dual_tree(global_: Tree, local: Tree) -> Tree:
    """A ``dual`` tree from a global and a local adapter, both in LoRA layout (no ``mix``)."""
    return merge_trees(global_, rename_keys(local, TO_LOCAL))


def anchor_states(
    base: Any, local: Tree, batches: Mapping[str, Array], n: int, training: ClientTraining
) -> tuple[Array, Array]:
    """(h [n, d] float32, valid [n]): the final hidden state of the last prompt token (the one
    before the first loss token) of the first ``n`` rows of ``batches``, under ``local`` alone.
    Rows beyond those available, and rows without a prompt or a loss token, are not valid."""
    rows = {k: batches[k].reshape((-1, batches[k].shape[-1])) for k in ("tokens", "attn_mask")}
    loss_mask = batches["loss_mask"].reshape((-1, batches["loss_mask"].shape[-1])) > 0
    take = min(n, rows["tokens"].shape[0])
    h = hidden(
        base,
        local,
        rows["tokens"][:take],
        rows["attn_mask"][:take],
        cfg=training.model,
        adapter_cfg=training.adapter,
        compute_dtype=jnp.dtype(training.compute_dtype),
    )
    last_prompt = jnp.argmax(loss_mask[:take], axis=1) - 1
    valid = jnp.any(loss_mask[:take], axis=1) & (last_prompt >= 0)
    e = h[jnp.arange(take), jnp.maximum(last_prompt, 0)].astype(jnp.float32)
    e = jnp.where(valid[:, None], e, 0.0)
    pad = n - take
    return jnp.pad(e, ((0, pad), (0, 0))), jnp.pad(valid, (0, pad)).astype(jnp.float32)


@register("feddpa", FedDPAOptions)
def feddpa(training: ClientTraining, options: FedDPAOptions) -> Algorithm:
    """server_state: the FedAvg family's (θ_g in ``params``); client_states: FedDPAClient."""
    require_kind("feddpa", training, ("dual",))
    lora = dataclasses.replace(training, adapter=dataclasses.replace(training.adapter, kind="lora"))
    steps_l = options.finetune_steps or training.local_steps
    finetune = dataclasses.replace(lora, local_steps=steps_l, optimizer_state="fresh")
    family = fedavg_family("feddpa", lora, all_shared(lora))
    inner = family.phases[0]
    loss_fn = make_loss_fn(lora)
    labels_l = placement_labels(dict.fromkeys(GLOBAL_KEYS, "personal"))  # θ_l in LoRA layout
    tx_l = make_optimizer(finetune, labels_l, steps_l)
    n_anchor, width = options.instances, training.model.hidden_size

    def init(key: Array, base: Any, n: int) -> tuple[Any, FedDPAClient]:
        server, clients = family.init(key, base, n)
        local = replicate(server.params, n)  # θ_l before any fine-tuning: the initial adapter
        anchors = jnp.zeros((n, n_anchor, width), jnp.float32)
        return server, FedDPAClient(clients, local, anchors, jnp.zeros((n, n_anchor), jnp.float32))

    def update_global(base, payload, state: FedDPAClient, batches, key, info):
        upload, fam, metrics = inner.client_update(base, payload, state.fedavg, batches, key, info)
        return upload, state.replace(fedavg=fam), metrics

    def broadcast_finetune(server, client_ids, info) -> Tree:
        return {"params": server.params}  # θ_g as just aggregated

    def update_finetune(base, payload, state: FedDPAClient, batches, key, info):
        start = payload["params"]  # FedDPA-F: the local adapter starts from the global one
        local, _, metrics = local_train(
            loss_fn, base, start, tx_l, tx_l.init(start), batches, key, labels_l
        )
        anchors, valid = anchor_states(base, local, batches, n_anchor, lora)
        new = state.replace(local=local, anchors=anchors, valid=valid)
        return {}, new, {**metrics, "anchors": jnp.sum(valid)}

    def models(server, clients: FedDPAClient, info) -> Models:
        g = family.models(server, clients.fedavg, info).global_
        n = info.num_clients
        personal = dual_tree(replicate(g, n), clients.local)
        personal[ANCHORS] = {
            "h": clients.anchors,
            "valid": clients.valid,
            "max_weight": jnp.full((n,), options.max_weight, jnp.float32),
        }
        return Models(with_mix(dual_tree(g, g), 1.0), personal)

    phases = (
        Phase(
            "global",
            training.local_steps,
            inner.broadcast,
            update_global,
            inner.aggregate,
            dict(inner.placement),
            payload_held=True,  # = the finetune phase's payload
            upload_origin=inner.upload_origin,
        ),
        Phase("finetune", steps_l, broadcast_finetune, update_finetune, None, LOCAL_PLACEMENT),
    )
    return Algorithm("feddpa", init, phases, models)
