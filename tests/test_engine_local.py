"""Client-training pieces: optimizer routing, schedules, the scanned local loop, aggregation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedlora_jax.adapters import AdapterConfig
from fedlora_jax.algorithms import ClientTraining
from fedlora_jax.algorithms.training import local_train, make_optimizer, make_schedule
from fedlora_jax.federated.aggregation import fedavg, normalise_weights
from fedlora_jax.federated.comm import per_client_nbytes, phase_bytes, tree_nbytes
from fedlora_jax.model.config import LlamaConfig

MODEL = LlamaConfig(
    vocab_size=32,
    hidden_size=8,
    intermediate_size=16,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
)


def training(**kw) -> ClientTraining:
    return ClientTraining(model=MODEL, adapter=AdapterConfig(r=2), **kw)


def test_routing_shared_personal_frozen():
    params = {"g": jnp.ones(3), "l": jnp.ones(3), "f": jnp.ones(3)}
    labels = {"g": "shared", "l": "personal", "f": "frozen"}
    tx = make_optimizer(training(lr=0.1), labels, 5, personal=training(lr=0.01))
    grads = jax.tree.map(lambda x: 2.0 * x, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    # Adam's first step is -lr · sign(g) (bias-corrected m / sqrt(v) = 1).
    np.testing.assert_allclose(updates["g"], -0.1, rtol=1e-4)
    np.testing.assert_allclose(updates["l"], -0.01, rtol=1e-4)
    np.testing.assert_array_equal(updates["f"], 0.0)


def test_frozen_leaf_gets_no_weight_decay_either():
    params = {"g": jnp.ones(2), "f": jnp.ones(2)}
    tx = make_optimizer(training(lr=0.1, weight_decay=0.5), {"g": "shared", "f": "frozen"}, 3)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["g"], -0.1 * 0.5 * 1.0, rtol=1e-5)  # decoupled decay
    np.testing.assert_array_equal(updates["f"], 0.0)


def test_clip_counts_only_the_group():
    params = {"g": jnp.zeros(1), "f": jnp.zeros(1)}
    tx = make_optimizer(training(grad_clip=1.0, lr=1.0), {"g": "shared", "f": "frozen"}, 2)
    tx_sgd_like = optax.partition(
        {"shared": optax.clip_by_global_norm(1.0), "frozen": optax.set_to_zero()},
        {"g": "shared", "f": "frozen"},
    )
    grads = {"g": jnp.array([0.5]), "f": jnp.array([100.0])}
    clipped, _ = tx_sgd_like.update(grads, tx_sgd_like.init(params))
    assert float(clipped["g"][0]) == 0.5  # a huge frozen gradient does not shrink the clip
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(updates["f"][0]) == 0.0


def test_bad_label_is_named():
    tx = make_optimizer(training(), {"x": "global"}, 2)
    with pytest.raises(ValueError, match=r"labels \['global'\] are not allowed"):
        tx.init({"x": jnp.ones(1)})


@pytest.mark.parametrize(
    ("kw", "counts", "expected"),
    [
        ({"schedule": "constant"}, [0, 9], [1.0, 1.0]),
        ({"schedule": "linear"}, [0, 5, 10], [1.0, 0.5, 0.0]),
        ({"schedule": "cosine"}, [0, 5, 10], [1.0, 0.5, 0.0]),
        ({"schedule": "linear", "warmup_steps": 2}, [0, 1, 2, 6], [0.0, 0.5, 1.0, 0.5]),
        ({"schedule": "linear", "optimizer_state": "persistent"}, [5, 15], [0.5, 0.5]),
    ],
)
def test_schedule_values(kw, counts, expected):
    sched = make_schedule(training(lr=1.0, **kw), 10)
    np.testing.assert_allclose([float(sched(c)) for c in counts], expected, atol=1e-6)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"schedule": "step"}, "training.schedule='step'"),
        ({"optimizer_state": "shared"}, "training.optimizer_state"),
        ({"compute_dtype": "float16"}, "training.compute_dtype"),
    ],
)
def test_bad_training_values_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(training(**kw), 4)


def test_local_train_equals_python_loop():
    """The scanned loop against plain per-step optax calls on a quadratic loss."""

    def loss_fn(base, params, batch, key):
        loss = jnp.mean((params["w"] * base - batch["x"]) ** 2)
        return loss, {"loss": loss, "tokens": jnp.int32(batch["x"].size)}

    base = jnp.float32(2.0)
    params = {"w": jnp.array([0.5, -1.0, 3.0])}
    xs = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    tx = make_optimizer(training(lr=0.05, schedule="linear"), {"w": "shared"}, 4)
    got, _, metrics = local_train(
        loss_fn, base, params, tx, tx.init(params), {"x": xs}, jax.random.PRNGKey(1)
    )
    p, s, losses, norms = params, tx.init(params), [], []
    for x in xs:
        (loss, _), g = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(base, p, {"x": x}, None)
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
        losses.append(float(loss))
        norms.append(float(jnp.linalg.norm(g["w"])))
    np.testing.assert_allclose(got["w"], p["w"], rtol=1e-6)
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["loss_first"]), losses[0], rtol=1e-6)
    assert float(metrics["tokens"]) == 4 * 3  # 4 steps x 3 loss "tokens" each (the aux count)
    np.testing.assert_allclose(float(metrics["loss_last"]), losses[-1], rtol=1e-6)
    np.testing.assert_allclose(float(metrics["grad_norm"]), np.mean(norms), rtol=1e-5)


def test_fedavg_against_numpy():
    rng = np.random.default_rng(0)
    u = {
        "a": rng.normal(size=(4, 3, 2)).astype(np.float32),
        "b": rng.normal(size=(4,)).astype(np.float32),
    }
    u["a"][2] = np.nan  # excluded client: weight 0 must keep NaN out
    w = np.array([1.0, 3.0, 0.0, 4.0], np.float32)
    got = fedavg(u, w)
    keep = [0, 1, 3]
    for k in u:
        ref = np.tensordot(w[keep] / w[keep].sum(), u[k][keep].astype(np.float64), axes=1)
        np.testing.assert_allclose(got[k], ref, rtol=1e-6)
    np.testing.assert_array_equal(normalise_weights(np.zeros(3)), 0.0)
    np.testing.assert_array_equal(fedavg(u, np.zeros(4))["b"], 0.0)


def test_comm_byte_helpers():
    tree = {"x": jnp.zeros((5, 3, 2), jnp.float32), "k": jnp.zeros((5, 2), jnp.uint32)}
    assert tree_nbytes(tree) == 5 * 6 * 4 + 5 * 2 * 4
    assert per_client_nbytes(tree) == 6 * 4 + 2 * 4
    shared = {"y": jnp.zeros((7,), jnp.bfloat16)}
    assert phase_bytes(shared, tree, False, True) == (14, 32)
    assert phase_bytes(tree, tree, True, False) == (32, 0)
