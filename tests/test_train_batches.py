"""RoundBatches: the engine's batch function over the data module's per-client epoch streams."""

from __future__ import annotations

import types

import numpy as np

from fedlora_jax.config import base_config
from fedlora_jax.data.batches import client_round_batches, packed_round_batches
from fedlora_jax.data.tokenize import TokenizedSet
from fedlora_jax.runner import RoundBatches


def _client(first_id: int, n: int) -> TokenizedSet:
    """n rows whose tokens encode their row id, so batches show which rows were drawn."""
    tokens = np.zeros((n, 8), np.int32)
    tokens[:, 0] = np.arange(first_id, first_id + n)
    tokens[:, 1:4] = 7
    return TokenizedSet(tokens, np.full(n, 4), np.full(n, 2), np.arange(first_id, first_id + n), 0)


def _setup(pooled: bool, packing: bool = False) -> tuple[RoundBatches, list, types.SimpleNamespace]:
    clients = [_client(0, 5), _client(100, 9)]
    data = types.SimpleNamespace(clients=[types.SimpleNamespace(train=c) for c in clients])
    phases = (types.SimpleNamespace(steps=2), types.SimpleNamespace(steps=1))
    algorithm = types.SimpleNamespace(phases=phases, pooled_data=pooled)
    cfg = base_config()
    cfg.federated.batch_size = 2
    cfg.data.max_seq_len = 8
    cfg.federated.packing = packing
    return RoundBatches(data, algorithm, cfg), clients, algorithm


def test_phases_get_consecutive_slices_of_one_round_draw() -> None:
    batches, clients, algorithm = _setup(pooled=False)
    ids = np.array([0, 1])
    g, l = (batches(3, p, ids) for p in algorithm.phases)
    assert g["tokens"].shape == (2, 2, 2, 8) and l["tokens"].shape == (2, 1, 2, 8)
    for k, c in enumerate(clients):
        whole = client_round_batches(c, steps=3, batch_size=2, seq_len=8, seed=0, round=3,
                                     client_id=k)  # fmt: skip
        for key in ("tokens", "loss_mask", "attn_mask"):
            np.testing.assert_array_equal(g[key][k], whole[key][:2])
            np.testing.assert_array_equal(l[key][k], whole[key][2:])
    # within an epoch the two phases draw distinct rows of client 1 (9 rows >= 6 drawn)
    drawn = np.concatenate([g["tokens"][1, ..., 0].ravel(), l["tokens"][1, ..., 0].ravel()])
    assert len(set(drawn.tolist())) == 6
    other = batches(4, algorithm.phases[0], ids)
    assert not np.array_equal(other["tokens"], g["tokens"])


def test_pooled_data_trains_one_client_on_the_union() -> None:
    batches, _, algorithm = _setup(pooled=True)
    out = batches(0, algorithm.phases[0], np.array([0]))
    rows = set(out["tokens"][0, ..., 0].ravel().tolist())
    assert rows <= set(range(5)) | set(range(100, 109))
    many = np.concatenate(
        [batches(r, algorithm.phases[0], np.array([0]))["tokens"][0, ..., 0].ravel()
         for r in range(10)]
    )  # fmt: skip
    assert set(many.tolist()) == set(range(5)) | set(range(100, 109))


def test_packed_phases_slice_one_packed_round() -> None:
    """With packing (the default) the phases slice one packed round draw the same way."""
    batches, clients, algorithm = _setup(pooled=False, packing=True)
    ids = np.array([0, 1])
    g, l = (batches(3, p, ids) for p in algorithm.phases)
    for k, c in enumerate(clients):
        whole = packed_round_batches(c, steps=3, batch_size=2, seq_len=8, seed=0, round=3,
                                     client_id=k)  # fmt: skip
        for key in ("tokens", "loss_mask", "attn_mask"):
            np.testing.assert_array_equal(g[key][k], whole[key][:2])
            np.testing.assert_array_equal(l[key][k], whole[key][2:])
    assert g["attn_mask"].max() == 2  # rows of 4 tokens: two examples per 8-slot row
