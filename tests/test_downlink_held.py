"""A phase whose payload the previous round's clients already hold (``Phase.payload_held``) is
downloaded only by the other clients: FedLoRA-Optimizer's global phase re-sends the adapter its
clients received in the previous round's personal phase (issue 15, finding 5)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax.algorithms.base import Algorithm, Models, Phase
from fedlora_jax.federated.comm import first_download_share
from fedlora_jax.federated.engine import EngineConfig, init_state, run_round
from fedlora_jax.federated.sampling import sample_clients

N, STEPS = 4, 1
ADAPTER_BYTES = 4 * 6  # one float32 [6] "adapter"


def _two_phases() -> Algorithm:
    """FedLoRA-Optimizer's shape: global (broadcast, train, aggregate), then personal (the new
    global broadcast again, nothing uploaded)."""

    def init(key, base, n):
        return {"adapters": jnp.zeros(6)}, {"own": jnp.zeros((n, 6))}

    def broadcast(server, ids, info):
        return server["adapters"]

    def update(base, payload, state, batches, key, info):
        return payload + 1.0, state, {"loss": jnp.float32(0.0)}

    def aggregate(server, uploads, weights, ids, info):
        return {"adapters": jnp.mean(uploads, axis=0)}

    def personal(base, payload, state, batches, key, info):
        return {}, {"own": payload}, {"loss": jnp.float32(0.0)}

    phases = (
        Phase("global", STEPS, broadcast, update, aggregate, payload_held=True),
        Phase("personal", STEPS, broadcast, personal, None),
    )
    return Algorithm("two_phases", init, phases, lambda s, c, i: Models(s["adapters"], None))


def _batches():
    ones = np.ones((N, STEPS, 1, 4), np.int32)
    return {"tokens": ones, "loss_mask": ones, "attn_mask": ones}


@pytest.mark.parametrize("per_round", [None, 2])
def test_held_payload_counted_once_per_round(per_round):
    alg, config = _two_phases(), EngineConfig(clients_per_round=per_round, seed=3, donate=False)
    state = init_state(alg, None, N, seed=0)
    downs = []
    for r in range(4):
        state, metrics = run_round(alg, state, None, _batches(), np.ones(N), config)
        downs.append(metrics["comm/down_bytes_per_client"])
        ids = sample_clients(3, r, N, per_round)
        assert metrics["clients"] == ids.tolist()
        # Hand count: every client downloads the new global adapter in the personal phase; the
        # global phase's adapter only the clients that were not sampled the round before.
        before = set(sample_clients(3, r - 1, N, per_round).tolist()) if r else set()
        fresh = len(set(ids.tolist()) - before)
        assert metrics["comm/down_bytes"] == pytest.approx(ADAPTER_BYTES * (len(ids) + fresh))
        assert metrics["comm/up_bytes_per_client"] == ADAPTER_BYTES
    assert downs[0] == 2 * ADAPTER_BYTES  # round 0: nobody holds the initial adapter
    if per_round is None:  # full participation: one adapter per client per round after round 0
        assert downs[1:] == [ADAPTER_BYTES] * 3


def test_first_download_share():
    assert first_download_share([0, 1, 2, 3], [1, 3]) == 0.5
    assert first_download_share(np.array([2]), np.array([0, 1])) == 1.0
    assert first_download_share([], [0]) == 0.0


def test_fedlora_optimizer_global_phase_is_held():
    from fedlora_jax import algorithms
    from fedlora_jax.adapters import AdapterConfig
    from fedlora_jax.algorithms import ClientTraining
    from fedlora_jax.model.config import LlamaConfig

    cfg = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=4)  # fmt: skip
    training = ClientTraining(model=cfg, adapter=AdapterConfig(kind="decomposed", r=2))
    alg = algorithms.get("fedlora_optimizer")(training)
    assert [(p.name, p.payload_held) for p in alg.phases] == [
        ("global", True),
        ("personal", False),
    ]
