"""Issue 13, item 1: the server optimizers (FedAvgM, FedAdam, FedYogi, FedAdagrad) against a numpy
server step over three rounds of hand-made uploads, and SCAFFOLD's control variates and server
update against numpy over two rounds (hand-made uploads) plus real stories260K rounds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_engine import SIZES, N, make_batches, tiny_stories

from fedlora_jax.adapters import AdapterConfig
from fedlora_jax.algorithms import ClientTraining, RoundInfo, get
from fedlora_jax.federated import engine as E
from fedlora_jax.model.config import LlamaConfig

TINY = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                   num_kv_heads=2, head_dim=4)  # fmt: skip
TRAINING = ClientTraining(model=TINY, adapter=AdapterConfig(r=2, targets="qv"), local_steps=2)
WEIGHTS = np.array([1.0, 0.0, 3.0], np.float32)  # client 1 excluded: its row must not count
LR, B1, B2, TAU, MOMENTUM = 0.1, 0.9, 0.99, 1e-3, 0.9


def np_server_step(rule: str, x, delta, state, t: int):
    """One server step in float64 on the mean client change Δ (t is 1-based). ``paper_*``:
    Reddi et al. Algorithm 2 verbatim; the others: optax's documented update on g = −Δ."""
    g = -delta
    if rule == "fedavgm":  # optax.sgd(momentum): trace = g + μ·trace; x −= η·trace
        state["m"] = g + MOMENTUM * state.get("m", 0.0)
        return x - LR * state["m"]
    if rule.startswith("paper_"):
        m = B1 * state.get("m", 0.0) + (1 - B1) * delta
        v = state.get("v", TAU**2)
        d2 = delta**2
        v = {"paper_adagrad": v + d2, "paper_yogi": v - (1 - B2) * d2 * np.sign(v - d2)}[rule]
        state.update(m=m, v=v)
        return x + LR * m / (np.sqrt(v) + TAU)
    if rule == "fedadagrad":  # optax.adagrad(initial 0, eps=τ): x −= η·g/√(Σg² + τ)
        state["v"] = state.get("v", 0.0) + g**2
        return x - LR * g / np.sqrt(state["v"] + TAU)
    init = 1e-6 if rule == "fedyogi" else 0.0
    m = B1 * state.get("m", init) + (1 - B1) * g
    v = state.get("v", init)
    v = v - (1 - B2) * np.sign(v - g**2) * g**2 if rule == "fedyogi" else B2 * v + (1 - B2) * g**2
    state.update(m=m, v=v)
    m_hat, v_hat = m / (1 - B1**t), v / (1 - B2**t)  # optax bias-corrects (the paper does not)
    return x - LR * m_hat / (np.sqrt(v_hat) + TAU)


CASES = {
    "fedavgm": ("fedavgm", {"server_lr": LR, "momentum": MOMENTUM}),
    "fedadam": ("fedadam", {"server_lr": LR, "b1": B1, "b2": B2, "tau": TAU}),
    "fedyogi": ("fedyogi", {"server_lr": LR, "b1": B1, "b2": B2, "tau": TAU}),
    "fedadagrad": ("fedadagrad", {"server_lr": LR, "tau": TAU}),
    "paper_yogi": (
        "fedyogi",
        {"server_lr": LR, "b1": B1, "b2": B2, "tau": TAU, "paper_literal": True},
    ),  # fmt: skip
    "paper_adagrad": (
        "fedadagrad",
        {"server_lr": LR, "b1": B1, "tau": TAU, "paper_literal": True},
    ),  # fmt: skip
}


def info(round_idx: int, n: int = 3) -> RoundInfo:
    return RoundInfo(jnp.int32(round_idx), jax.random.key(round_idx), 3, n)


def hand_uploads(params, round_idx: int):
    """Three clients' uploads around ``params``; the excluded client's row is garbage."""
    rng = np.random.default_rng(round_idx)

    def rows(x):
        x = np.asarray(x, np.float64)
        near = [x + rng.normal(scale=0.05 * (k + 1), size=x.shape) for k in range(3)]
        near[1] = np.full(x.shape, 1e6)
        return np.stack(near)

    return jax.tree.map(rows, params)


def np_mean_of_valid(uploads):
    w = WEIGHTS.astype(np.float64) / WEIGHTS.sum()
    return jax.tree.map(lambda u: np.tensordot(w, np.where(WEIGHTS[:, None, None] > 0, u, 0), 1),
                        uploads)  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_server_optimizer_matches_numpy_over_three_rounds(case):
    name, options = CASES[case]
    alg = get(name)(TRAINING, **options)
    server, _ = alg.init(jax.random.key(0), None, 3)
    x = jax.tree.map(lambda a: np.asarray(a, np.float64), server.params)
    states = jax.tree.map(lambda _: {}, x)
    ids = jnp.arange(3)
    for t in range(3):
        uploads = hand_uploads(server.params, t)
        mean = np_mean_of_valid(uploads)
        x = jax.tree.map(lambda xx, m, s, t=t: np_server_step(case, xx, m - xx, s, t + 1),
                         x, mean, states, is_leaf=lambda v: isinstance(v, np.ndarray))  # fmt: skip
        stacked = jax.tree.map(lambda u: jnp.asarray(u, jnp.float32), uploads)
        server = alg.phases[0].aggregate(server, stacked, jnp.asarray(WEIGHTS), ids, info(t))
        jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5),
                     server.params, x)  # fmt: skip


def test_paper_literal_differs_from_optax_where_documented():
    """Bias correction and the moments' start: the two FedYogi variants part ways at step 1."""
    out = []
    for paper in (False, True):
        alg = get("fedyogi")(TRAINING, paper_literal=paper)
        server, _ = alg.init(jax.random.key(0), None, 3)
        uploads = jax.tree.map(
            lambda u: jnp.asarray(u, jnp.float32), hand_uploads(server.params, 0)
        )
        new = alg.phases[0].aggregate(server, uploads, jnp.asarray(WEIGHTS), jnp.arange(3), info(0))
        out.append(new.params)
    gaps = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), *out)
    assert max(jax.tree.leaves(gaps)) > 1e-4


def test_adagrad_momentum_needs_paper_literal():
    from fedlora_jax.algorithms.base import OptionsError

    with pytest.raises(OptionsError, match="b1=0.9 needs paper_literal=True"):
        get("fedadagrad")(TRAINING, b1=0.9)


@pytest.mark.parametrize("server_lr", [1.0, 0.5])
def test_scaffold_server_update_matches_numpy_over_two_rounds(server_lr):
    """x ← x + η_g·mean_w(Δy) (data-weighted, valid clients), c ← c + Σ_valid Δc_i / N."""
    n = 5
    alg = get("scaffold")(TRAINING, server_lr=server_lr)
    server, clients = alg.init(jax.random.key(0), None, n)
    assert {v.shape[0] for v in jax.tree.leaves(clients.variate)} == {n}  # c_i: one row each
    x = jax.tree.map(lambda a: np.asarray(a, np.float64), server.params)
    c = jax.tree.map(np.zeros_like, x)
    for t in range(2):
        ys = hand_uploads(server.params, t)
        dcs = hand_uploads(jax.tree.map(jnp.zeros_like, server.params), t + 10)
        mean = np_mean_of_valid(ys)
        x = jax.tree.map(lambda xx, m: xx + server_lr * (m - xx), x, mean)
        c = jax.tree.map(lambda cc, d: cc + (d[0] + d[2]) / n, c, dcs)
        uploads = {"params": ys, "variate": dcs}
        stacked = jax.tree.map(lambda u: jnp.asarray(u, jnp.float32), uploads)
        ids = jnp.array([0, 2, 4])
        server = alg.phases[0].aggregate(server, stacked, jnp.asarray(WEIGHTS), ids, info(t, n))
        close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # noqa: E731
        jax.tree.map(close, server.params, x)
        jax.tree.map(close, server.variate, c)


@pytest.fixture(scope="module")
def stories(stories_dir):
    return tiny_stories(stories_dir)


def test_scaffold_real_rounds_keep_c_the_mean_of_the_client_variates(stories):
    """Two engine rounds on stories260K (3 of 4 clients a round): with every client valid the
    server variate stays c = (1/N)·Σ_i c_i over ALL clients (numpy), the variates move, and
    SCAFFOLD sends exactly twice FedIT's bytes each way (x and c down, y and Δc_i up)."""
    cfg, base = stories
    training = ClientTraining(model=cfg, adapter=AdapterConfig(r=2, targets="qv"), local_steps=2,
                              lr=1e-2)  # fmt: skip
    config = E.EngineConfig(clients_per_round=3, seed=3, rounds=2)
    batches = {k: v for k, v in make_batches().items() if k != "poison"}
    comm = {}
    for name in ("scaffold", "fedit"):
        alg = get(name)(training)
        state = E.init_state(alg, base, N, seed=0)
        for _ in range(2 if name == "scaffold" else 1):
            state, metrics = E.run_round(alg, state, base, batches, SIZES, config)
            assert metrics["train/excluded"] == []
        comm[name] = (metrics["comm/down_bytes_per_client"], metrics["comm/up_bytes_per_client"])
        if name == "scaffold":
            c = state.server_state.variate
            ci = state.client_states.variate
            mean_ci = jax.tree.map(lambda b: np.asarray(b, np.float64).mean(0), ci)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         c, mean_ci)  # fmt: skip
            assert max(jax.tree.leaves(jax.tree.map(lambda v: float(jnp.abs(v).max()), c))) > 0
    assert comm["scaffold"] == (2 * comm["fedit"][0], 2 * comm["fedit"][1])
