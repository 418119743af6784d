"""The algorithm contract (API v2): placement specs against real rounds on stories260K, typed
options with one-line errors, and the FedAvg family's hooks reducing to FedIT."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_engine import SIZES, STEPS, N, make_batches, np_weighted_mean, tiny_stories

from fedlora_jax import runner
from fedlora_jax.adapters import AdapterConfig
from fedlora_jax.algorithms import ClientTraining, get, names
from fedlora_jax.algorithms.base import OptionsError, keys_placed, placement_labels
from fedlora_jax.config import ALGORITHM_KINDS, ConfigError, load_config
from fedlora_jax.federated import engine as E
from fedlora_jax.federated.sampling import sample_clients

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = E.EngineConfig(clients_per_round=3, seed=3, rounds=2)
KINDS = ALGORITHM_KINDS  # each algorithm's own adapter kind (lora otherwise)
# FedAvg-family configurations whose new shared leaves are the plain weighted mean of uploads.
MEAN_OF_MODELS = ("fedit", "ffa_lora", "fedsa_lora", "fedprox", "local_only")


@pytest.fixture(scope="module")
def model(stories_dir):
    return tiny_stories(stories_dir)


def training_for(name: str, model_cfg) -> ClientTraining:
    adapter = AdapterConfig(kind=KINDS.get(name, "lora"), r=2, targets="qv")
    return ClientTraining(model=model_cfg, adapter=adapter, local_steps=STEPS, lr=1e-2)


def build(name, model_cfg):
    options = {"rank": 2, "targets": "adapter", "ajive_samples": 50} if name == "fedgalore" else {}
    return get(name)(training_for(name, model_cfg), **options)


def info(round_idx=0):
    return E.RoundInfo(jnp.int32(round_idx), jax.random.key(0), CONFIG.rounds, N)


def leaf_keys(tree) -> set[str]:
    return {p[-1].key for p, _ in jax.tree_util.tree_leaves_with_path(tree)}


def phase_batches(phase, ids):
    b = {k: v[ids][:, : phase.steps] for k, v in make_batches().items() if k != "poison"}
    return b


def client_outputs(alg, p, state, base, ids):
    """Phase p's (uploads, new client rows) of the sampled clients, one jitted client at a time
    (independent of the engine's stacking), with the engine's keys."""
    phase = alg.phases[p]
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.round), p)
    payload = phase.broadcast(state.server_state, jnp.asarray(ids), info(state.round))
    update = jax.jit(phase.client_update)
    batches = phase_batches(phase, ids)
    outs = []
    for k, i in enumerate(ids):
        own = jax.tree.map(lambda x, k=k: x[k], payload) if phase.per_client_broadcast else payload
        row = jax.tree.map(lambda x, i=i: x[i], state.client_states)
        b = {name: v[k] for name, v in batches.items()}
        outs.append(update(base, own, row, b, jax.random.fold_in(key, int(i)), info(state.round)))
    return [o[0] for o in outs], [o[1] for o in outs]


@pytest.mark.parametrize("name", names())
def test_placement_spec_matches_uploads_and_optimizer_labels(name, model):
    """Every phase: a `personal` or `frozen` leaf never appears in an upload; the optimizer
    labels are the spec's (frozen and server leaves get the zero-update label)."""
    cfg, base = model
    alg = build(name, cfg)
    state = E.init_state(alg, base, N, seed=0)
    ids = sample_clients(CONFIG.seed, 0, N, 3)
    for p, phase in enumerate(alg.phases):
        assert phase.placement, f"{name}/{phase.name} declares no placement"
        uploads, _ = client_outputs(alg, p, state, base, ids[:1])
        shared = set(keys_placed(phase.placement, "shared"))
        got = leaf_keys(uploads[0])
        if name == "fedgalore":  # uploads its change of dW as factors (plus GaLore statistics)
            assert leaf_keys(uploads[0]["low"]) == shared
        else:
            assert got <= shared, (name, phase.name, got)
            assert not got & set(keys_placed(phase.placement, "personal", "frozen", "server"))
            assert bool(got) == (phase.aggregate is not None)
        keys = tuple(phase.placement)
        fake = {"layers": {"0": {"attn": {"q_proj": dict.fromkeys(keys, jnp.zeros(1))}}}}
        labels = placement_labels(phase.placement)(fake)["layers"]["0"]["attn"]["q_proj"]
        for key, where in phase.placement.items():
            assert labels[key] == (where if where in ("shared", "personal") else "frozen")


@pytest.mark.parametrize("name", [*MEAN_OF_MODELS, "fedlora_optimizer"])
def test_real_round_obeys_the_placement_spec(name, model):
    """One engine round on stories260K: shared leaves = the data-weighted mean of the uploads
    (numpy); frozen leaves bitwise unchanged; personal leaves change only for sampled clients
    and equal what each client kept."""
    cfg, base = model
    alg = build(name, cfg)
    state0 = E.init_state(alg, base, N, seed=0)
    ids = sample_clients(CONFIG.seed, 0, N, 3)
    before = jax.tree.map(np.array, E.models(alg, state0, N, CONFIG))  # state0 gets donated
    uploads, rows = client_outputs(alg, 0, state0, base, ids)
    batches = {ph.name: make_batches() for ph in alg.phases}
    for b in batches.values():
        del b["poison"]
    state, metrics = E.run_round(alg, state0, base, batches, SIZES, CONFIG)
    assert metrics["clients"] == ids.tolist()
    after = jax.tree.map(np.asarray, E.models(alg, state, N, CONFIG))
    placement = alg.phases[0].placement
    if alg.phases[0].aggregate is not None:
        mean = np_weighted_mean(uploads, SIZES[ids])
        server = state.server_state.adapters if name == "fedlora_optimizer" else after.global_
        for path, x in jax.tree_util.tree_leaves_with_path(mean):
            got = server
            for part in path:
                got = got[part.key]
            # one jitted client at a time vs the engine's vmap: float tolerance
            np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-5, err_msg=str(path))
    ref_before = before.personal if before.personal is not None else before.global_
    ref_after = after.personal if after.personal is not None else after.global_
    flat_b = dict(jax.tree_util.tree_leaves_with_path(ref_before))
    for path, x in jax.tree_util.tree_leaves_with_path(ref_after):
        where = placement[path[-1].key]
        if where == "frozen":
            np.testing.assert_array_equal(x, flat_b[path], err_msg=str(path))
        if where == "personal" and after.personal is not None:
            unsampled = sorted(set(range(N)) - set(ids.tolist()))
            np.testing.assert_array_equal(x[unsampled], flat_b[path][unsampled])
            assert np.abs(x[ids] - flat_b[path][ids]).max() > 0, path
    if name == "fedlora_optimizer":  # personal phase: B_M personal, the rest frozen
        frozen = keys_placed(alg.phases[1].placement, "frozen")
        glob = dict(jax.tree_util.tree_leaves_with_path(after.global_))
        for path, x in jax.tree_util.tree_leaves_with_path(after.personal):
            g = np.broadcast_to(glob[path], x.shape)
            if path[-1].key in frozen:
                np.testing.assert_array_equal(x, g, err_msg=str(path))
            else:
                assert np.abs(x[ids] - g[ids]).max() > 0, path
    if name == "fedsa_lora":  # the personal B each client kept is what it trained
        for k, i in enumerate(ids):
            kept = jax.tree.map(lambda x, i=i: x[i], state.client_states.personal)
            jax.tree.map(
                lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                kept,
                rows[k].personal,
            )


def test_unknown_and_mistyped_options_are_one_line_errors(model):
    training = training_for("fedprox", model[0])
    with pytest.raises(OptionsError) as unknown:
        get("fedprox")(training, nu=0.1)
    assert str(unknown.value) == (
        "algorithm.options.nu is not an option of fedprox; valid options of fedprox: "
        "mu: float = 0.01"
    )
    with pytest.raises(OptionsError) as mistyped:
        get("fedavgm")(training, momentum="high")
    assert str(mistyped.value) == (
        "algorithm.options.momentum='high' is not a float; valid options of fedavgm: "
        "server_lr: float = 1.0, momentum: float = 0.9"
    )
    with pytest.raises(OptionsError, match=r"mu=-1.0 must be >= 0; valid options of fedprox"):
        get("fedprox")(training, mu=-1)
    with pytest.raises(OptionsError, match="is not an option of fedit; valid options of fedit"):
        get("fedit")(training, mu=0.0)
    for err in (unknown.value, mistyped.value):
        assert "\n" not in str(err)
    # through the CLI's config: the same line as a ConfigError
    cfg = load_config(
        str(REPO / "configs" / "dolly.py") + ":smoke",
        ["algorithm.name=fedavgm", "algorithm.options.momentum=high"],
    )
    with pytest.raises(ConfigError, match="momentum='high' is not a float; valid options"):
        runner.build_algorithm(cfg, training, N)


def cli_algorithm(overrides, model_cfg):
    cfg = load_config(str(REPO / "configs" / "dolly.py") + ":smoke", overrides)
    return runner.build_algorithm(cfg, training_for("fedit", model_cfg), N)


def two_rounds(alg, base):
    state = E.init_state(alg, base, N, seed=0)
    for r in range(2):
        batches = {k: v for k, v in make_batches(r).items() if k != "poison"}
        state, _ = E.run_round(alg, state, base, batches, SIZES, CONFIG)
    return E.models(alg, state, N, CONFIG).global_


@pytest.fixture(scope="module")
def fedit_global(model):
    cfg, base = model
    return two_rounds(cli_algorithm(["algorithm.name=fedit"], cfg), base)


def test_fedprox_with_mu_0_is_fedit_bitwise(model, fedit_global):
    cfg, base = model
    alg = cli_algorithm(["algorithm.name=fedprox", "algorithm.options.mu=0"], cfg)
    assert alg.name == "fedprox"
    jax.tree.map(np.testing.assert_array_equal, two_rounds(alg, base), fedit_global)
    proximal = get("fedprox")(training_for("fedprox", cfg), mu=10.0)
    moved = two_rounds(proximal, base)  # the hook is live: a strong pull changes the result
    diffs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), moved, fedit_global)
    assert max(jax.tree.leaves(diffs)) > 0


def test_fedavgm_with_momentum_0_and_server_lr_1_is_fedit(model, fedit_global):
    cfg, base = model
    overrides = [
        "algorithm.name=fedavgm",
        "algorithm.options.momentum=0",
        "algorithm.options.server_lr=1",
    ]
    got = two_rounds(cli_algorithm(overrides, cfg), base)
    # x + (mean − x) is the mean up to float rounding
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got,
                 fedit_global)  # fmt: skip


def test_options_are_hashable_and_key_the_compiled_phase(model):
    cfg, _ = model
    training = training_for("fedadam", cfg)
    a, b = get("fedadam")(training, tau=1e-3), get("fedadam")(training, tau=0.001)
    assert a is not b and a.cache_key == b.cache_key
    assert get("fedadam")(training, tau=1e-2).cache_key != a.cache_key


def test_server_owned_base_delta_is_applied_in_the_forward(model):
    """A ``base_delta`` leaf (placement ``server``) adds x @ ΔW0 in every adapted linear: the
    same logits as the base with W0 + ΔW0 written into it, and merge_into_base folds it in."""
    from fedlora_jax.adapters import init_adapters, merge_into_base
    from fedlora_jax.adapters.base import BASE_DELTA
    from fedlora_jax.model.config import linear_specs
    from fedlora_jax.model.llama import apply

    cfg, base = model
    adapter_cfg = AdapterConfig(r=2)
    lora = init_adapters(jax.random.key(0), cfg, adapter_cfg)
    rng = np.random.default_rng(0)
    with_delta = jax.tree.map(lambda x: x, lora)
    for i, layer in with_delta["layers"].items():
        for name, leaf in layer["attn"].items():
            shape = linear_specs(cfg)[f"layers.{i}.attn.{name}"]
            leaf[BASE_DELTA] = jnp.asarray(rng.normal(size=shape).astype(np.float32) * 0.05)
    tokens = jnp.asarray(make_batches()["tokens"][0, 0])
    mask = jnp.ones_like(tokens)
    kw = dict(cfg=cfg, adapter_cfg=adapter_cfg)
    got = apply(base, with_delta, tokens, mask, **kw)
    deltas_only = jax.tree.map(lambda x: x, with_delta)
    moved = dict(base)
    layers = {g: dict(v) if isinstance(v, dict) else v for g, v in base["layers"].items()}
    for i, layer in deltas_only["layers"].items():
        for name, leaf in layer["attn"].items():
            w = layers["attn"][name]
            layers["attn"][name] = w.at[int(i)].add(leaf[BASE_DELTA])
    moved["layers"] = layers
    want = apply(moved, lora, tokens, mask, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(got - apply(base, lora, tokens, mask, **kw)).max()) > 1e-3
    merged = merge_into_base(base, with_delta, adapter_cfg)
    np.testing.assert_allclose(apply(merged, None, tokens, mask, cfg=cfg), want, atol=1e-4)


def test_control_variates_hook_follows_scaffold_option_2(model):
    """The FedAvg family's SCAFFOLD hook (issue 13 registers the method): the client's new
    variate is c_i − c + (x − y)/(E·lr), the upload carries its change, the server adds
    Σ_valid Δc_i / N to c (numpy), and the correction c − c_i moves the client's steps."""
    from fedlora_jax.algorithms.fedavg import all_shared, fedavg_family

    cfg, base = model
    training = training_for("fedit", cfg)
    alg = fedavg_family("scaffold", training, all_shared(training), control_variates=True)
    server, clients = alg.init(jax.random.PRNGKey(0), base, N)
    phase = alg.phases[0]
    rng = np.random.default_rng(0)
    c = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), server.params)
    server = server.replace(variate=c)
    row = jax.tree.map(lambda x: x[1], clients)
    batches = {k: v[1] for k, v in make_batches().items() if k != "poison"}
    payload = phase.broadcast(server, jnp.array([1]), info())
    upload, new_row, _ = phase.client_update(base, payload, row, batches, jax.random.key(1), info())
    scale = 1.0 / (STEPS * training.lr)
    f64 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float64), t)  # noqa: E731
    want = jax.tree.map(
        lambda ci, cc, x, y: ci - cc + (x - y) * scale,
        f64(row.variate), f64(c), f64(server.params), f64(upload["params"]),
    )  # fmt: skip
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                 new_row.variate, want)  # fmt: skip
    jax.tree.map(np.testing.assert_array_equal, upload["variate"], new_row.variate)  # c_i was 0
    plain = fedavg_family("fedit_like", training, all_shared(training))
    p_server, p_clients = plain.init(jax.random.PRNGKey(0), base, N)
    uncorrected = plain.phases[0].client_update(
        base, plain.phases[0].broadcast(p_server, jnp.array([1]), info()),
        jax.tree.map(lambda x: x[1], p_clients), batches, jax.random.key(1), info(),
    )[0]  # fmt: skip
    diffs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), upload["params"], uncorrected)
    assert max(jax.tree.leaves(diffs)) > 0
    # server: params = FedAvg of the uploaded params, c += Σ over valid clients of Δc_i / N
    stacked = jax.tree.map(lambda x: jnp.stack([x, x + 1.0, x - 2.0]), upload)
    weights = jnp.array([1.0, 0.0, 3.0])  # client 2 excluded
    new = phase.aggregate(server, stacked, weights, jnp.array([0, 2, 3]), info())
    d = stacked["variate"]
    jax.tree.map(
        lambda got, c0, dv: np.testing.assert_allclose(
            got, np.asarray(c0) + (np.asarray(dv[0]) + np.asarray(dv[2])) / N, rtol=1e-5, atol=1e-6
        ),
        new.variate, c, d,
    )  # fmt: skip
    mean = np_weighted_mean([jax.tree.map(lambda x, k=k: x[k], stacked["params"]) for k in (0, 2)],
                            np.array([1.0, 3.0]))  # fmt: skip
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 new.params, mean)  # fmt: skip
