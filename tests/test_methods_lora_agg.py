"""Exact and heterogeneous-rank LoRA aggregation (issue 13, item 2): every ``aggregate`` against
numpy on hand-made uploads (a rank-2 and a rank-4 client, an excluded one), the exactness that
FedEx-LoRA and FLoRA exist for, heterogeneous ranks as one program (vmap = chunked, padded rows
exactly zero, honest bytes), client-rank config errors, and a smoke round per method through
``scripts/train.py``."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_engine import SIZES, STEPS, N, make_batches, tiny_stories

from fedlora_jax import runner
from fedlora_jax.adapters import AdapterConfig, init_adapters
from fedlora_jax.adapters.base import BASE_DELTA
from fedlora_jax.algorithms import ClientTraining, RoundInfo, get
from fedlora_jax.algorithms.rank_mask import parse_client_ranks
from fedlora_jax.config import ConfigError, load_config
from fedlora_jax.federated import engine as E

REPO = pathlib.Path(__file__).resolve().parents[1]
R_MAX, ALPHA = 4, 8.0
SCALE = ALPHA / R_MAX
RANKS = (2, 4, 2, 4)  # clients 0 and 2 train at rank 2, clients 1 and 3 at rank 4
WEIGHTS = np.array([1.0, 3.0, 0.0], np.float32)  # uploads: rank 2, rank 4, excluded
UPLOAD_RANKS = (2, 4, 4)
METHODS = ("fedex_lora", "flora", "flexlora", "rolora")


@pytest.fixture(scope="module")
def model(stories_dir):
    return tiny_stories(stories_dir)


def training(model_cfg, steps=STEPS) -> ClientTraining:
    adapter = AdapterConfig(r=R_MAX, alpha=ALPHA, targets="qv")
    return ClientTraining(model=model_cfg, adapter=adapter, local_steps=steps, lr=1e-2)


def info(round_idx=0) -> RoundInfo:
    return RoundInfo(jnp.int32(round_idx), jax.random.key(7), None, N)


def modules(tree):
    """{path: leaf} of every module leaf (a dict holding A)."""
    out = {}

    def walk(node, path):
        if "A" in node:
            out[path] = node
        else:
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else k)

    walk(tree, "")
    return out


def hand_uploads(server_params, seed=0):
    """Stacked uploads [3, ...] per module: client 0 at rank 2 (rows/columns >= 2 zero),
    client 1 at rank 4, client 2 excluded (NaN: weight 0 must keep it out)."""
    rng = np.random.default_rng(seed)

    def leaf(node):
        a_shape, b_shape = node["A"].shape, node["B"].shape
        A = rng.normal(size=(3, *a_shape)).astype(np.float32)
        B = rng.normal(size=(3, *b_shape)).astype(np.float32)
        for k, r in enumerate(UPLOAD_RANKS):
            A[k, r:] = 0.0
            B[k, :, r:] = 0.0
        A[2], B[2] = np.nan, np.nan
        return {"A": jnp.asarray(A), "B": jnp.asarray(B)}

    def walk(node):
        return leaf(node) if "A" in node else {k: walk(v) for k, v in node.items()}

    return walk(server_params)


def np_products(up):
    """(Σ p_k B_k A_k, Ā, B̄) in float64 over the valid uploads."""
    p = WEIGHTS[:2].astype(np.float64) / WEIGHTS[:2].sum()
    A, B = (np.asarray(up[k][:2], np.float64) for k in ("A", "B"))
    prod = sum(p[k] * B[k] @ A[k] for k in range(2))
    return prod, np.tensordot(p, A, 1), np.tensordot(p, B, 1)


def random_base_delta(params, seed=1):
    rng = np.random.default_rng(seed)

    def walk(node):
        if "A" in node:
            bd = rng.normal(size=node[BASE_DELTA].shape).astype(np.float32) * 0.1
            return {**node, BASE_DELTA: jnp.asarray(bd)}
        return {k: walk(v) for k, v in node.items()}

    return walk(params)


def aggregated(name, model_cfg, **options):
    alg = get(name)(training(model_cfg), **options)
    server, _ = alg.init(jax.random.PRNGKey(0), None, N)
    if BASE_DELTA in next(iter(modules(server.params).values())):
        server = server.replace(params=random_base_delta(server.params))
    uploads = hand_uploads(server.params)
    new = alg.phases[0].aggregate(server, uploads, jnp.asarray(WEIGHTS), jnp.array([0, 1, 2]),
                                  info())  # fmt: skip
    return server, uploads, new


@pytest.mark.parametrize("ranks", ["", "2,4,2,4"])
def test_fedex_lora_aggregate_matches_numpy_and_is_exact(model, ranks):
    server, uploads, new = aggregated("fedex_lora", model[0], client_ranks=ranks)
    old, ups, got = modules(server.params), modules(uploads), modules(new.params)
    for path, leaf in got.items():
        prod, A_bar, B_bar = np_products(ups[path])
        bd_old = np.asarray(old[path][BASE_DELTA], np.float64)
        np.testing.assert_allclose(leaf["A"], A_bar, rtol=1e-5, atol=1e-6, err_msg=path)
        np.testing.assert_allclose(leaf["B"], B_bar, rtol=1e-5, atol=1e-6, err_msg=path)
        want_bd = bd_old + SCALE * (prod - B_bar @ A_bar).T
        np.testing.assert_allclose(leaf[BASE_DELTA], want_bd, rtol=1e-5, atol=1e-5, err_msg=path)
        # the reason FedEx-LoRA exists: the global ΔW is the average of the clients' products
        dw = (
            np.asarray(leaf[BASE_DELTA]) + SCALE * (np.asarray(leaf["B"]) @ np.asarray(leaf["A"])).T
        )
        np.testing.assert_allclose(dw, bd_old + SCALE * prod.T, rtol=1e-5, atol=1e-5)


def test_flora_aggregate_stacks_exactly_and_restarts_lora(model):
    cfg = model[0]
    server, uploads, new = aggregated("flora", cfg, client_ranks="2,4,2,4")
    old, ups, got = modules(server.params), modules(uploads), modules(new.params)
    fresh = modules(init_adapters(info().key, cfg, training(cfg).adapter))
    for path, leaf in got.items():
        prod, _, _ = np_products(ups[path])
        bd_old = np.asarray(old[path][BASE_DELTA], np.float64)
        np.testing.assert_allclose(leaf[BASE_DELTA], bd_old + SCALE * prod.T, rtol=1e-5,
                                   atol=1e-5, err_msg=path)  # fmt: skip
        np.testing.assert_array_equal(leaf["B"], 0.0)  # fresh LoRA: global ΔW = base delta
        np.testing.assert_array_equal(leaf["A"], fresh[path]["A"])
        assert np.abs(np.asarray(leaf["A"]) - np.asarray(old[path]["A"])).max() > 0


@pytest.mark.parametrize(("sigma", "beta"), [("sqrt", 0.5), ("B", 1.0), ("A", 0.0)])
def test_flexlora_aggregate_is_the_truncated_svd(model, sigma, beta):
    _, uploads, new = aggregated("flexlora", model[0], client_ranks="2,4,2,4", sigma=sigma)
    ups, got = modules(uploads), modules(new.params)
    for path, leaf in got.items():
        prod, _, _ = np_products(ups[path])
        u, s, vt = np.linalg.svd(prod)
        best = (u[:, :R_MAX] * s[:R_MAX]) @ vt[:R_MAX]
        A, B = np.asarray(leaf["A"], np.float64), np.asarray(leaf["B"], np.float64)
        np.testing.assert_allclose(B @ A, best, rtol=1e-4, atol=1e-4, err_msg=path)
        np.testing.assert_allclose(np.linalg.norm(B, axis=0), s[:R_MAX] ** beta, rtol=1e-4)
        np.testing.assert_allclose(np.linalg.norm(A, axis=1), s[:R_MAX] ** (1 - beta), rtol=1e-4)


@pytest.mark.parametrize("round_idx", [0, 1])
def test_rolora_aggregates_only_the_trained_factor(model, round_idx):
    cfg = model[0]
    alg = get("rolora")(training(cfg), client_ranks="2,4,2,4")
    server, _ = alg.init(jax.random.PRNGKey(0), None, N)
    uploads = hand_uploads(server.params)
    new = alg.phases[0].aggregate(server, uploads, jnp.asarray(WEIGHTS), jnp.array([0, 1, 2]),
                                  info(round_idx))  # fmt: skip
    trained, kept = ("A", "B") if round_idx == 1 else ("B", "A")
    old, ups = modules(server.params), modules(uploads)
    for path, leaf in modules(new.params).items():
        _, A_bar, B_bar = np_products(ups[path])
        want = A_bar if trained == "A" else B_bar
        np.testing.assert_allclose(leaf[trained], want, rtol=1e-5, atol=1e-6, err_msg=path)
        np.testing.assert_array_equal(leaf[kept], old[path][kept])


def test_rolora_client_freezes_the_other_factor(model):
    """A real client update: round 0 leaves A bitwise as received and moves B (and round 1 the
    reverse), and reports that it sends only the trained factor."""
    cfg, base = model
    alg = get("rolora")(training(cfg))
    server, clients = alg.init(jax.random.PRNGKey(0), base, N)
    phase = alg.phases[0]
    row = jax.tree.map(lambda x: x[1], clients)
    batches = {k: v[1] for k, v in make_batches().items() if k != "poison"}
    for round_idx, frozen in ((0, "A"), (1, "B")):
        if round_idx == 1:  # B must be non-zero for A to get a gradient
            server = server.replace(params=jax.tree.map(lambda x: x + 0.01, server.params))
        payload = phase.broadcast(server, jnp.array([1]), info(round_idx))
        update = jax.jit(phase.client_update)
        up, _, metrics = update(base, payload, row, batches, jax.random.key(1), info(round_idx))
        trained = "B" if frozen == "A" else "A"
        for path, leaf in modules(up).items():
            sent = modules(server.params)[path]
            np.testing.assert_array_equal(leaf[frozen], sent[frozen])
            assert np.abs(np.asarray(leaf[trained]) - np.asarray(sent[trained])).max() > 0
        assert float(metrics[f"up_rank/{frozen}"]) == 0.0
        assert float(metrics[f"up_rank/{trained}"]) == R_MAX


def test_fedit_is_not_exact_on_the_same_uploads(model):
    server, uploads, new = aggregated("fedit", model[0])
    ups, got = modules(uploads), modules(new.params)
    worst = 0.0
    for path, leaf in got.items():
        prod, A_bar, B_bar = np_products(ups[path])
        np.testing.assert_allclose(leaf["A"], A_bar, rtol=1e-5, atol=1e-6)
        dw = SCALE * (np.asarray(leaf["B"]) @ np.asarray(leaf["A"]))
        worst = max(worst, float(np.abs(dw - SCALE * prod).max()))
    assert worst > 0.1  # the averaged factors' product is not the average product


# ----------------------------------------------------------------------------- one program


def engine_round(alg, base, config):
    state = E.init_state(alg, base, N, seed=0)
    batches = {k: v for k, v in make_batches().items() if k != "poison"}
    return E.run_round(alg, state, base, batches, SIZES, config)


@pytest.mark.parametrize("name", METHODS)
def test_heterogeneous_round_is_one_program_with_zero_padding(model, name):
    check_heterogeneous_round(model, name)


def check_heterogeneous_round(model, name, **options):
    """A round with ranks (2, 4, 2, 4): vmap and chunked agree; every rank-2 client's upload
    keeps rows/columns >= 2 exactly zero after real training; its personal model is the global
    truncated to rank 2; the bytes count each client at its own rank. (Shared with the tests of
    the methods that live in their own files, e.g. test_hetlora.py.)"""
    cfg, base = model
    alg = get(name)(training(cfg), client_ranks=",".join(map(str, RANKS)), **options)
    vmap_cfg = E.EngineConfig(clients_per_round=3, seed=3)
    chunk_cfg = E.EngineConfig(backend="chunked", chunk_size=2, clients_per_round=3, seed=3)
    state_v, metrics = engine_round(alg, base, vmap_cfg)
    state_c, _ = engine_round(alg, base, chunk_cfg)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 state_v.server_state.params, state_c.server_state.params)  # fmt: skip
    # the uploads of that round, from the engine's own phase function
    ids = np.asarray(metrics["clients"])
    batches = {k: v[ids] for k, v in make_batches().items() if k != "poison"}
    state0 = E.init_state(alg, base, N, seed=0)
    core = jax.jit(E._phase_core(alg.phases[0], vmap_cfg, N))
    out = core(base, state0.server_state, state0.client_states, jnp.asarray(ids), batches,
               state0.rng, np.int32(0), np.int32(0), jnp.asarray(SIZES[ids]))  # fmt: skip
    uploads = modules(out[6])
    for k, cid in enumerate(ids):
        r = RANKS[cid]
        for path, leaf in uploads.items():
            A, B = np.asarray(leaf["A"][k]), np.asarray(leaf["B"][k])
            assert np.all(A[r:] == 0) and np.all(B[:, r:] == 0), (cid, path)
            assert np.abs(A[:r]).min() > 0 and np.abs(B[:, :r]).max() > 0, (cid, path)
    personal = modules(E.models(alg, state_v, N, vmap_cfg).personal)
    for leaf in personal.values():
        assert np.all(np.asarray(leaf["A"])[0, 2:] == 0)
        assert np.abs(np.asarray(leaf["A"])[1, 2:]).max() > 0
    # q_proj 64 -> 64 and v_proj 64 -> 32 in 2 layers: r·(in + out) floats per module
    per_rank = (64 + 64 + 64 + 32) * 2 * 4
    down = np.mean([RANKS[i] * per_rank for i in ids])
    if name == "rolora":  # round 0 sends B only: [out, r] with out 64 (q) and 32 (v)
        per_rank = (64 + 32) * 2 * 4
    up = np.mean([RANKS[i] * per_rank for i in ids])
    assert metrics["comm/up_bytes_per_client"] == pytest.approx(up)
    dense = (64 * 64 + 64 * 32) * 2 * 4  # base delta [in, out] per module, sent whole
    dense = dense if name in ("fedex_lora", "flora") else 0
    assert metrics["comm/down_bytes_per_client"] == pytest.approx(down + dense)
    assert metrics["train/up_rank/B"] == pytest.approx(np.mean([RANKS[i] for i in ids]))


def test_client_ranks_spec_and_errors(model):
    assert parse_client_ranks("2,4,8,8", 4, 8, 0) == (2, 4, 8, 8)
    assert parse_client_ranks("cycle:2,4,8", 5, 8, 0) == (2, 4, 8, 2, 4)
    drawn = parse_client_ranks("uniform:2,8", 6, 8, 1)
    assert set(drawn) <= {2, 8} and drawn == parse_client_ranks("uniform:2,8", 6, 8, 1)
    assert parse_client_ranks("", 4, 8, 0) == ()
    for spec, match in [
        ("2,4", "2 ranks for 4 clients"),
        ("2,16,4,4", r"ranks \[16\] are outside \[1, adapter.r=8\]"),
        ("2,x", "not a list of integers"),
        ("zipf:2,4", "unknown form 'zipf'"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_client_ranks(spec, 4, 8, 0)
    tr = training(model[0])
    smoke = str(REPO / "configs" / "dolly.py") + ":smoke"
    cfg = load_config(smoke, ["algorithm.name=fedit", "federated.client_ranks=2,4,2,4"])
    with pytest.raises(ConfigError, match="fedit trains every client at adapter.r; algorithms"):
        runner.build_algorithm(cfg, tr, N)
    cfg = load_config(smoke, ["algorithm.name=flora", "federated.client_ranks=2,9,2,4"])
    with pytest.raises(ConfigError, match=r"ranks \[9\] are outside"):
        runner.build_algorithm(cfg, tr, N)
    cfg = load_config(smoke, ["algorithm.name=flora", "federated.client_ranks=cycle:2,4"])
    assert runner.build_algorithm(cfg, tr, N).cache_key[1].client_ranks == "2,4,2,4"


# ----------------------------------------------------------------------------- smoke


def _train_main():
    spec = importlib.util.spec_from_file_location("train_script", REPO / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("name", METHODS)
def test_smoke_round_through_train_script(name, read_shipped_lines, tmp_path):
    """One round, one client step, a tiny evaluation, heterogeneous ranks (r_max = 4)."""
    rows = read_shipped_lines("dolly/databricks-dolly-15k.jsonl.gz")[:120]
    subset = tmp_path / "dolly120.jsonl"
    subset.write_text("\n".join(rows) + "\n")
    code = _train_main()(
        ["--config", str(REPO / "configs" / "dolly.py") + ":smoke", "--no_progress",
         f"--config.run.out_dir={tmp_path}", "--config.federated.rounds=1",
         "--config.federated.local_steps=1", "--config.eval.max_examples_per_client=1",
         "--config.eval.max_new_tokens=2", f"--config.algorithm.name={name}",
         "--config.federated.client_ranks=cycle:2,4", "--config.data.source=path",
         f"--config.data.path={subset}"]
    )  # fmt: skip
    assert code == 0
    final = json.loads((tmp_path / f"dolly-smoke-{name}-seed0" / "final_eval.json").read_text())
    g = final["global"]["metrics"]["loss"]
    p = final["personal"]["summary"]["loss"]["mean"]
    print(f"SMOKE {name}: global loss {g:.4f}, personal loss {p:.4f}")
    assert np.isfinite(g) and np.isfinite(p)
