"""Adapter kinds and tree functions, checked against numpy, torch's init and hand-worked cases."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from fedlora_jax.adapters import (
    AdapterConfig,
    count_params,
    decompose,
    get_kind,
    init_adapters,
    label_tree,
    leaf_paths,
    materialize,
    merge_into_base,
    mixer_weights,
    recompose,
    select_targets,
)
from fedlora_jax.adapters.decomposed import PAPER_LITERAL_B_MAGNITUDE
from fedlora_jax.adapters.lora import dropout, kaiming_bound, kaiming_uniform
from fedlora_jax.adapters.peft import export_peft, load_peft
from fedlora_jax.model.config import LlamaConfig

IN, OUT, R = 12, 10, 4
RNG = np.random.default_rng(0)


def _rand(*shape: int) -> jnp.ndarray:
    return jnp.asarray(RNG.standard_normal(shape), jnp.float32)


@pytest.fixture(scope="module")
def model_cfg(stories_dir) -> LlamaConfig:
    return LlamaConfig.from_hf_dict(json.loads((stories_dir / "config.json").read_text()))


# ----------------------------------------------------------------------------- init statistics


def test_kaiming_bound_is_torch_bound() -> None:
    for fan_in in (3, 64, 172, 4096):
        gain = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5))
        assert kaiming_bound(fan_in) == pytest.approx(gain * math.sqrt(3.0 / fan_in), rel=1e-12)
        assert kaiming_bound(fan_in) == pytest.approx(1 / math.sqrt(fan_in), rel=1e-12)


def test_kaiming_samples_match_torch_statistics() -> None:
    shape, fan_in = (64, 500), 500
    t = torch.empty(shape)
    torch.manual_seed(0)
    torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    ours = np.asarray(kaiming_uniform(jax.random.key(0), shape, fan_in))
    theirs = t.numpy()
    bound = 1 / math.sqrt(fan_in)
    for sample in (ours, theirs):
        assert np.abs(sample).max() <= bound
        assert np.abs(sample).max() > 0.999 * bound
    # U(-b, b) has std b/sqrt(3); 32k samples put both within 1.5 % of it and of each other.
    assert ours.std() == pytest.approx(theirs.std(), rel=0.02)
    assert ours.std() == pytest.approx(bound / math.sqrt(3), rel=0.015)
    assert abs(ours.mean()) < 0.02 * bound


def test_lora_init_matches_peft_layer_bound() -> None:
    import peft

    layer = torch.nn.Sequential(torch.nn.Linear(IN, OUT, bias=False))
    model = peft.get_peft_model(layer, peft.LoraConfig(r=R, lora_alpha=8, target_modules=["0"]))
    peft_a = model.base_model.model[0].lora_A["default"].weight.detach().numpy()
    peft_b = model.base_model.model[0].lora_B["default"].weight.detach().numpy()
    leaf = get_kind("lora").init(jax.random.key(1), IN, OUT, AdapterConfig(r=R))
    assert leaf["A"].shape == peft_a.shape and leaf["B"].shape == peft_b.shape
    for a in (peft_a, leaf["A"]):
        assert np.abs(a).max() <= kaiming_bound(IN)
    assert not np.any(peft_b) and not np.any(leaf["B"])


# ----------------------------------------------------------------------------- lora


def test_lora_apply_and_delta_match_numpy() -> None:
    cfg = AdapterConfig(r=R, alpha=6.0)
    leaf = {"A": _rand(R, IN), "B": _rand(OUT, R)}
    x = _rand(2, 3, IN)
    kind = get_kind("lora")
    want = 1.5 * np.asarray(x) @ np.asarray(leaf["A"]).T @ np.asarray(leaf["B"]).T
    np.testing.assert_allclose(kind.apply(leaf, x, cfg, None), want, rtol=1e-5, atol=1e-5)
    dw = kind.delta_weight(leaf, cfg)
    assert dw.shape == (IN, OUT)
    np.testing.assert_allclose(np.asarray(x) @ np.asarray(dw), want, rtol=1e-5, atol=1e-5)


def test_dropout_is_inverted_and_keyed() -> None:
    x = _rand(50, 40)
    assert dropout(x, 0.25, None) is x and dropout(x, 0.0, jax.random.key(0)) is x
    y = np.asarray(dropout(x, 0.25, jax.random.key(3)))
    kept = y != 0
    np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
    assert 0.2 < 1 - kept.mean() < 0.3
    # LoRA applies it to its input only: the output is the low-rank map of the dropped input.
    cfg = AdapterConfig(r=R, alpha=4.0, dropout=0.25)
    leaf = {"A": _rand(R, 40), "B": _rand(OUT, R)}
    got = get_kind("lora").apply(leaf, x, cfg, jax.random.key(3))
    want = y @ np.asarray(leaf["A"]).T @ np.asarray(leaf["B"]).T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- decomposed


def test_decomposed_hand_worked_row_and_col() -> None:
    # Row-wise: rows of A_D have norms 5 and 2 -> unit rows [.6 .8], [0 1]; times A_M = [2, 3].
    row = AdapterConfig(kind="decomposed", r=2, norm_eps=1e-12)
    leaf = {
        "A_M": jnp.array([2.0, 3.0]),
        "A_D": jnp.array([[3.0, 4.0], [0.0, 2.0]]),
        "B_M": jnp.array([1.0, 0.5, 2.0]),
        "B_D": jnp.array([[0.0, 7.0], [6.0, 8.0], [1.0, 0.0]]),
    }
    A, B = recompose(leaf, row)
    np.testing.assert_allclose(A, [[1.2, 1.6], [0.0, 3.0]], atol=1e-6)
    np.testing.assert_allclose(B, [[0.0, 1.0], [0.3, 0.4], [2.0, 0.0]], atol=1e-6)
    # Column-wise: columns of A_D have norms 5 and 1 -> [.6 .8]^T, [0 1]^T; times A_M = [2, 3].
    col = AdapterConfig(kind="decomposed", r=2, norm_eps=1e-12, norm_axis="col")
    leaf = {
        "A_M": jnp.array([2.0, 3.0]),
        "A_D": jnp.array([[3.0, 0.0], [4.0, 1.0]]),
        "B_M": jnp.array([10.0, 1.0]),
        "B_D": jnp.array([[0.0, 3.0], [2.0, 4.0], [0.0, 0.0]]),
    }
    A, B = recompose(leaf, col)
    np.testing.assert_allclose(A, [[1.2, 0.0], [1.6, 3.0]], atol=1e-6)
    np.testing.assert_allclose(B, [[0.0, 0.6], [10.0, 0.8], [0.0, 0.0]], atol=1e-6)


@pytest.mark.parametrize("axis", ["row", "col"])
def test_decompose_recompose_roundtrip(axis: str) -> None:
    cfg = AdapterConfig(kind="decomposed", r=R, norm_axis=axis)
    A, B = _rand(R, IN), _rand(OUT, R)
    leaf = decompose(A, B, cfg)
    m_shapes = {"row": ((R,), (OUT,)), "col": ((IN,), (R,))}[axis]
    assert (leaf["A_M"].shape, leaf["B_M"].shape) == m_shapes
    A2, B2 = recompose(leaf, cfg)
    np.testing.assert_allclose(A2, A, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(B2, B, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("axis", ["row", "col"])
def test_decomposed_init(axis: str) -> None:
    cfg = AdapterConfig(kind="decomposed", r=R, norm_axis=axis)
    kind = get_kind("decomposed")
    leaf = kind.init(jax.random.key(0), IN, OUT, cfg)
    reduce = 1 if axis == "row" else 0
    assert not np.any(leaf["B_M"])
    assert leaf["B_M"].shape == ((OUT,) if axis == "row" else (R,))
    np.testing.assert_allclose(np.linalg.norm(leaf["B_D"], axis=reduce), 1.0, rtol=1e-6)
    assert not np.any(kind.delta_weight(leaf, cfg))
    A, _ = recompose(leaf, cfg)
    np.testing.assert_allclose(A, leaf["A_D"], rtol=1e-6)  # A_D = A: recomposition reproduces A
    assert np.abs(A).max() <= kaiming_bound(IN)


def test_decomposed_paper_literal_init_is_small_nonzero() -> None:
    cfg = AdapterConfig(kind="decomposed", r=R, init="paper_literal")
    leaf = get_kind("decomposed").init(jax.random.key(0), IN, OUT, cfg)
    _, B = recompose(leaf, cfg)
    np.testing.assert_allclose(np.linalg.norm(B, axis=1), PAPER_LITERAL_B_MAGNITUDE, rtol=1e-5)


@pytest.mark.parametrize("axis", ["row", "col"])
def test_decomposed_zero_b_m_still_gets_gradient(axis: str) -> None:
    cfg = AdapterConfig(kind="decomposed", r=R, norm_axis=axis)
    kind = get_kind("decomposed")
    leaf = kind.init(jax.random.key(0), IN, OUT, cfg)
    x, target = _rand(5, IN), _rand(5, OUT)

    def loss(p):
        return jnp.sum((kind.apply(p, x, cfg, None) - target) ** 2)

    g = jax.grad(loss)(leaf)
    assert np.abs(g["B_M"]).min() > 0  # every magnitude moves at step 0
    assert not np.any(g["A_M"]) and not np.any(g["A_D"])  # B = 0 blocks A, as in LoRA
    stepped = jax.tree.map(lambda p, d: p - 0.1 * d, leaf, g)
    g2 = jax.grad(loss)(stepped)
    for name in ("A_M", "A_D", "B_M", "B_D"):
        assert np.abs(g2[name]).max() > 0, name


# ----------------------------------------------------------------------------- mixture


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_mixture_init_and_router() -> None:
    leaf = get_kind("mixture").init(jax.random.key(0), IN, OUT, AdapterConfig(kind="mixture", r=R))
    for name in ("A0", "B0", "B1"):
        assert not np.any(leaf[name]), name
    assert leaf["G"].shape == (2, IN)
    for name in ("A1", "G"):
        assert np.abs(leaf[name]).max() <= kaiming_bound(IN) and np.any(leaf[name])
    x = _rand(3, 4, IN).astype(jnp.bfloat16)
    g = mixer_weights(leaf, x)
    assert g.dtype == jnp.float32 and g.shape == (3, 4, 2)
    np.testing.assert_allclose(g.sum(-1), 1.0, rtol=1e-6)
    want = _softmax(np.asarray(x, np.float32) @ np.asarray(leaf["G"]).T)
    np.testing.assert_allclose(g, want, rtol=1e-5)


def test_mixture_row_contributes_exactly_zero_in_round_one() -> None:
    cfg = AdapterConfig(kind="mixture", r=R, alpha=8.0)
    kind = get_kind("mixture")
    leaf = kind.init(jax.random.key(0), IN, OUT, cfg) | {"B1": _rand(OUT, R)}
    x = _rand(6, IN)
    g = np.asarray(mixer_weights(leaf, x))
    individual = 2.0 * np.asarray(x) @ np.asarray(leaf["A1"]).T @ np.asarray(leaf["B1"]).T
    np.testing.assert_allclose(
        kind.apply(leaf, x, cfg, None), g[:, 1:] * individual, rtol=1e-5, atol=1e-6
    )
    grads = jax.grad(lambda p: jnp.sum(kind.apply(p, x, cfg, None) ** 2))(leaf)
    assert not np.any(grads["A0"]) and not np.any(grads["B0"])
    assert np.any(grads["G"]) and np.any(grads["A1"])


def test_mixture_branches_share_one_dropout_sample() -> None:
    # Identical branches: with a shared mask the output is (g0 + g1)·branch = branch, i.e. exactly
    # the LoRA output with the same key; two independent masks would not give this.
    cfg = AdapterConfig(kind="mixture", r=R, dropout=0.5)
    A, B = _rand(R, IN), _rand(OUT, R)
    leaf = {"A0": A, "B0": B, "A1": A, "B1": B, "G": _rand(2, IN)}
    x, key = _rand(20, IN), jax.random.key(7)
    lora_cfg = AdapterConfig(r=R, dropout=0.5)
    want = get_kind("lora").apply({"A": A, "B": B}, x, lora_cfg, key)
    np.testing.assert_allclose(
        get_kind("mixture").apply(leaf, x, cfg, key), want, rtol=1e-5, atol=1e-5
    )
    other = get_kind("lora").apply({"A": A, "B": B}, x, lora_cfg, jax.random.key(8))
    assert not np.allclose(other, want)


def test_mixture_has_no_single_delta() -> None:
    cfg = AdapterConfig(kind="mixture", r=R)
    leaf = get_kind("mixture").init(jax.random.key(0), IN, OUT, cfg)
    with pytest.raises(ValueError, match="mixture"):
        get_kind("mixture").delta_weight(leaf, cfg)
    with pytest.raises(ValueError, match="materialize supports"):
        materialize({"layers": {"0": {"attn": {"q_proj": leaf}}}}, cfg)


# ----------------------------------------------------------------------------- dense delta


def test_dense_delta() -> None:
    cfg = AdapterConfig(kind="dense_delta")
    kind = get_kind("dense_delta")
    leaf = kind.init(jax.random.key(0), IN, OUT, cfg)
    assert leaf["dW"].shape == (IN, OUT) and not np.any(leaf["dW"])
    leaf = {"dW": _rand(IN, OUT)}
    x = _rand(3, IN)
    np.testing.assert_allclose(
        kind.apply(leaf, x, cfg, jax.random.key(0)),
        np.asarray(x) @ np.asarray(leaf["dW"]),
        rtol=1e-5,
        atol=1e-5,
    )
    assert kind.delta_weight(leaf, cfg) is leaf["dW"]


# ----------------------------------------------------------------------------- targets and trees


def test_target_presets_select_hand_listed_paths() -> None:
    def sel(targets: str) -> list[str]:
        return select_targets(2, AdapterConfig(targets=targets))

    assert sel("qv") == [
        "layers.0.attn.q_proj",
        "layers.0.attn.v_proj",
        "layers.1.attn.q_proj",
        "layers.1.attn.v_proj",
    ]
    assert sel("attn") == [f"layers.{i}.attn.{m}_proj" for i in (0, 1) for m in "qkvo"]
    assert sel("all-linear") == [
        f"layers.{i}.{m}"
        for i in (0, 1)
        for m in (
            "attn.q_proj",
            "attn.k_proj",
            "attn.v_proj",
            "attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ]
    assert sel(r"layers\.1\.mlp\.down_proj") == ["layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match="adapter.targets='nothing'"):
        sel("nothing")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "lorax"}, "adapter.kind='lorax' is not known; allowed: decomposed, dense_delta"),
        ({"norm_axis": "diag"}, "adapter.norm_axis='diag' is not allowed; allowed: row, col"),
        ({"init": "zeros"}, "adapter.init='zeros' is not allowed; allowed: default, paper_literal"),
        ({"r": 0}, "adapter.r=0"),
        ({"dropout": 1.0}, "adapter.dropout=1.0"),
    ],
)
def test_bad_config_names_key_and_allowed(model_cfg: LlamaConfig, kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("[", r"\[")):
        init_adapters(jax.random.key(0), model_cfg, AdapterConfig(**kwargs))


def test_init_adapters_is_deterministic_per_path(model_cfg: LlamaConfig) -> None:
    key = jax.random.key(42)
    qv = init_adapters(key, model_cfg, AdapterConfig(targets="qv"))
    every = init_adapters(key, model_cfg, AdapterConfig(targets="all-linear"))
    assert leaf_paths(qv) == select_targets(model_cfg.num_layers, AdapterConfig(targets="qv"))
    for path in leaf_paths(qv):
        i, _, m = path.split(".")[1:]
        np.testing.assert_array_equal(
            qv["layers"][i]["attn"][m]["A"], every["layers"][i]["attn"][m]["A"]
        )
    a = [np.asarray(every["layers"]["0"]["attn"][m]["A"]) for m in ("q_proj", "o_proj")]
    assert not np.allclose(a[0], a[1])  # different modules, different draws
    again = init_adapters(key, model_cfg, AdapterConfig(targets="all-linear"))
    jax.tree.map(np.testing.assert_array_equal, every, again)


def test_count_params_hand_computed(model_cfg: LlamaConfig) -> None:
    # stories260K: d = 64, kv dim = 32, f = 172, 5 layers, r = 8.
    q, v = 8 * 64 + 64 * 8, 8 * 64 + 32 * 8
    tree = init_adapters(jax.random.key(0), model_cfg, AdapterConfig(targets="qv"))
    assert count_params(tree) == 5 * (q + v)
    dense = init_adapters(
        jax.random.key(0),
        model_cfg,
        AdapterConfig(kind="dense_delta", targets=r"layers\.0\.mlp\.down_proj"),
    )
    assert count_params(dense) == 172 * 64


def test_merge_into_base_adds_delta_at_layer(model_cfg: LlamaConfig) -> None:
    from fedlora_jax.model.llama import init_random_base

    base = init_random_base(jax.random.key(0), model_cfg)
    cfg = AdapterConfig(r=2, alpha=3.0, targets=r"layers\.(1|3)\.(attn\.v_proj|mlp\.down_proj)")
    tree = init_adapters(jax.random.key(1), model_cfg, cfg)
    tree = jax.tree.map(lambda x: x + 0.1, tree)  # make B non-zero
    merged = merge_into_base(base, tree, cfg)
    for group, name in (("attn", "v_proj"), ("mlp", "down_proj")):
        W0, W = np.asarray(base["layers"][group][name]), np.asarray(merged["layers"][group][name])
        for i in range(model_cfg.num_layers):
            if i in (1, 3):
                leaf = tree["layers"][str(i)][group][name]
                want = W0[i] + 1.5 * (np.asarray(leaf["B"]) @ np.asarray(leaf["A"])).T
                np.testing.assert_allclose(W[i], want, rtol=1e-5, atol=1e-6)
            else:
                np.testing.assert_array_equal(W[i], W0[i])
    np.testing.assert_array_equal(
        merged["layers"]["attn"]["q_proj"], base["layers"]["attn"]["q_proj"]
    )
    assert merged["embed"] is base["embed"]
    assert base["layers"]["attn"]["v_proj"] is not merged["layers"]["attn"]["v_proj"]  # not mutated


def test_materialize_gives_factors(model_cfg: LlamaConfig) -> None:
    cfg = AdapterConfig(kind="decomposed", targets="qv", init="paper_literal")
    tree = init_adapters(jax.random.key(0), model_cfg, cfg)
    factors = materialize(tree, cfg)
    assert leaf_paths(factors) == leaf_paths(tree)
    leaf = tree["layers"]["2"]["attn"]["v_proj"]
    A, B = recompose(leaf, cfg)
    got = factors["layers"]["2"]["attn"]["v_proj"]
    assert set(got) == {"A", "B"}
    np.testing.assert_array_equal(got["A"], A)
    np.testing.assert_array_equal(got["B"], B)


def test_label_tree_routes_optax_partition(model_cfg: LlamaConfig) -> None:
    cfg = AdapterConfig(kind="decomposed", targets=r"layers\.0\.attn\.q_proj")
    tree = init_adapters(jax.random.key(0), model_cfg, cfg)
    labels = label_tree(tree, {"A_M": "global", "A_D": "global", "B_D": "global", "B_M": "local"})
    assert labels == {
        "layers": {
            "0": {
                "attn": {
                    "q_proj": {"A_M": "global", "A_D": "global", "B_D": "global", "B_M": "local"}
                }
            }
        }
    }
    opt = optax.partition({"global": optax.set_to_zero(), "local": optax.sgd(1.0)}, labels)
    grads = jax.tree.map(jnp.ones_like, tree)
    updates, _ = opt.update(grads, opt.init(tree), tree)
    leaf = updates["layers"]["0"]["attn"]["q_proj"]
    assert not np.any(leaf["A_D"]) and np.all(np.asarray(leaf["B_M"]) == -1.0)
    by_fn = label_tree(tree, lambda path, key: f"{path}:{key}")
    assert by_fn["layers"]["0"]["attn"]["q_proj"]["B_M"] == "layers.0.attn.q_proj:B_M"
    with pytest.raises(ValueError, match="no entry for adapter key 'B_M'"):
        label_tree(tree, {"A_M": "g", "A_D": "g", "B_D": "g"})


# ----------------------------------------------------------------------------- PEFT files


def test_peft_export_load_roundtrip(tmp_path, model_cfg: LlamaConfig) -> None:
    cfg = AdapterConfig(r=4, alpha=8.0, dropout=0.05, targets="all-linear")
    tree = jax.tree.map(lambda x: x + 0.5, init_adapters(jax.random.key(0), model_cfg, cfg))
    export_peft(tree, cfg, model_cfg, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
    assert "model.layers.4.mlp.down_proj" in config["target_modules"]
    loaded, loaded_cfg = load_peft(tmp_path, model_cfg)
    assert loaded_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, loaded, tree)
    assert leaf_paths(loaded) == leaf_paths(tree)


def test_peft_load_rejects_bad_folder(tmp_path, model_cfg: LlamaConfig) -> None:
    with pytest.raises(FileNotFoundError, match="adapter_config.json: not found"):
        load_peft(tmp_path)
    cfg = AdapterConfig(r=2, targets="qv")
    export_peft(init_adapters(jax.random.key(0), model_cfg, cfg), cfg, model_cfg, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(ValueError, match="unsupported PEFT adapter: use_dora=true"):
        load_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"r": 3}))
    with pytest.raises(ValueError, match=r"expected \(3, 64\), \(64, 3\) \(r=3\)"):
        load_peft(tmp_path, model_cfg)
