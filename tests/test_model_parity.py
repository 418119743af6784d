"""The JAX forward against transformers' torch LlamaForCausalLM (fp32), plus adapters, remat,
bf16, KV cache and the loss. Reference values are computed independently (torch, numpy)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fedlora_jax.adapters.base import AdapterConfig, AdapterKind, register_kind  # noqa: E402
from fedlora_jax.adapters.tree import init_adapters  # noqa: E402
from fedlora_jax.model import llama  # noqa: E402
from fedlora_jax.model.config import LlamaConfig  # noqa: E402
from fedlora_jax.model.loss import lm_loss, sequence_nll, token_nll  # noqa: E402

TOL = 1e-4
FWD = jax.jit(llama.apply, static_argnames=("cfg", "adapter_cfg", "compute_dtype", "remat"))


def _hf_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """HF logits with HF generate's position convention (cumsum(mask) - 1, pads clipped)."""
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(pos),
        )
    return out.logits.numpy()


def _batch(vocab: int, b: int, t: int, pad: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    for i in range(1, b):  # row 0 unpadded; the others padded by different amounts
        n = 3 * i
        if pad == "left":
            mask[i, :n] = 0
        elif pad == "right":
            mask[i, t - n :] = 0
    return tokens, mask


def _max_err(ours: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(np.asarray(ours) - ref)[mask == 1].max())


# ----------------------------------------------------------------------------- stories260K


@pytest.mark.parametrize("pad", ["none", "left", "right"])
def test_stories_logits_match_hf(stories_jax, stories_torch, pad):
    cfg, base = stories_jax
    tokens, mask = _batch(cfg.vocab_size, 3, 48, pad)
    ours = FWD(base, None, tokens, mask, cfg=cfg)
    assert ours.dtype == jnp.float32 and ours.shape == (3, 48, cfg.vocab_size)
    assert _max_err(ours, _hf_logits(stories_torch, tokens, mask), mask) <= TOL


def test_padding_does_not_change_real_tokens(stories_jax):
    """A left-padded row equals the same tokens unpadded (positions restart at the first real)."""
    cfg, base = stories_jax
    tokens, mask = _batch(cfg.vocab_size, 2, 30, "left")
    padded = np.asarray(FWD(base, None, tokens, mask, cfg=cfg))[1, 3:]
    alone = np.asarray(FWD(base, None, tokens[1:, 3:], mask[1:, 3:], cfg=cfg))[0]
    np.testing.assert_allclose(padded, alone, atol=TOL)


# ----------------------------------------------------------------------------- random configs

RANDOM_CONFIGS = {
    "gqa_tied_default": dict(num_key_value_heads=2, tie_word_embeddings=True, rope=None),
    "mha_untied_linear": dict(
        num_key_value_heads=4,
        tie_word_embeddings=False,
        rope={"rope_type": "linear", "factor": 2.5, "rope_theta": 500.0},
    ),
    "gqa_untied_llama3": dict(
        num_key_value_heads=1,
        tie_word_embeddings=False,
        rope={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 10000.0,
        },
    ),
}


def _hf_config(num_key_value_heads: int, tie_word_embeddings: bool, rope: dict | None, **kw):
    rope = rope or {"rope_type": "default", "rope_theta": 10000.0}
    return transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=num_key_value_heads,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_parameters=rope,
        tie_word_embeddings=tie_word_embeddings,
        **kw,
    )


@pytest.fixture(scope="module", params=sorted(RANDOM_CONFIGS))
def random_model(request, hf_to_base):
    torch.manual_seed(0)
    hf_cfg = _hf_config(**RANDOM_CONFIGS[request.param])
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # larger weights and non-unit norms, so every term matters
        for name, p in model.named_parameters():
            noise = torch.randn_like(p)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)
    cfg = LlamaConfig.from_hf_dict(hf_cfg.to_dict())
    return cfg, hf_to_base(model), model


@pytest.mark.parametrize("pad", ["left", "right"])
def test_random_configs_match_hf(random_model, pad):
    cfg, base, model = random_model
    assert ("lm_head" in base) != cfg.tie_word_embeddings
    tokens, mask = _batch(cfg.vocab_size, 3, 40, pad, seed=1)
    ours = FWD(base, None, tokens, mask, cfg=cfg)
    assert _max_err(ours, _hf_logits(model, tokens, mask), mask) <= TOL


@pytest.mark.parametrize("name", ["mha_untied_linear", "gqa_untied_llama3"])
def test_rope_inv_freq_matches_hf(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = _hf_config(**RANDOM_CONFIGS[name])
    cfg = LlamaConfig.from_hf_dict(hf_cfg.to_dict())
    ref = ROPE_INIT_FUNCTIONS[cfg.rope_scaling.rope_type](hf_cfg)[0].numpy()
    ours = llama.rope_inv_freq(cfg)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    plain = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    ratio = plain / ours
    if name == "gqa_untied_llama3":  # all three llama3 regimes are exercised
        assert np.isclose(ratio, 1.0).any() and np.isclose(ratio, 8.0).any()
        assert ((ratio > 1.01) & (ratio < 7.99)).any()
    else:
        np.testing.assert_allclose(ratio, 2.5, rtol=1e-5)


def test_init_random_base_matches_hf_layout(random_model):
    cfg, base, _ = random_model
    ours = llama.init_random_base(jax.random.PRNGKey(0), cfg, jnp.bfloat16)
    shapes = jax.tree.map(lambda x: x.shape, ours)
    assert shapes == jax.tree.map(lambda x: x.shape, base)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(ours))


# ----------------------------------------------------------------------------- adapters

LORA_QV = AdapterConfig(kind="lora", r=4, alpha=8.0, targets="qv")
LORA_PARTIAL = AdapterConfig(
    kind="lora", r=2, alpha=4.0, targets=r"layers\.(0|3)\.attn\.q_proj|layers\.1\.mlp\.down_proj"
)


def _nonzero_lora(cfg: LlamaConfig, acfg: AdapterConfig, seed: int = 0) -> dict:
    """LoRA with random non-zero B (fresh LoRA has B = 0, which would hide mistakes)."""
    tree = init_adapters(jax.random.PRNGKey(seed), cfg, acfg)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 64))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: 0.3 * jax.random.normal(next(keys), x.shape) if p[-1].key == "B" else x, tree
    )


def _merged(base: dict, adapters: dict, acfg: AdapterConfig) -> dict:
    """W0 + scale * A.T @ B.T per adapted module, in plain numpy (independent of the kinds)."""
    merged = jax.tree.map(np.array, base)
    for i, layer in adapters["layers"].items():
        for group, mods in layer.items():
            for name, leaf in mods.items():
                delta = acfg.scale * np.asarray(leaf["A"]).T @ np.asarray(leaf["B"]).T
                merged["layers"][group][name][int(i)] += delta
    return merged


def _mean_loss(base, adapters, tokens, mask, cfg, acfg, remat=False):
    logits = llama.apply(base, adapters, tokens, mask, cfg=cfg, adapter_cfg=acfg, remat=remat)
    total, n = lm_loss(logits, tokens, mask)
    return total / n


VALUE_AND_GRAD = jax.jit(
    jax.value_and_grad(_mean_loss, argnums=(0, 1)), static_argnames=("cfg", "acfg", "remat")
)


@pytest.mark.parametrize("acfg", [LORA_QV, LORA_PARTIAL], ids=["all_layers_qv", "partial"])
def test_adapters_equal_merged_weights_values_and_grads(stories_jax, acfg):
    cfg, base = stories_jax
    adapters = _nonzero_lora(cfg, acfg)
    tokens, mask = _batch(cfg.vocab_size, 2, 24, "right", seed=2)
    merged = _merged(base, adapters, acfg)
    ours = FWD(base, adapters, tokens, mask, cfg=cfg, adapter_cfg=acfg)
    ref = FWD(merged, None, tokens, mask, cfg=cfg)
    assert _max_err(ours, np.asarray(ref), mask) <= TOL
    assert _max_err(ours, np.asarray(FWD(base, None, tokens, mask, cfg=cfg)), mask) > 1e-2

    _, (_, g_adapters) = VALUE_AND_GRAD(base, adapters, tokens, mask, cfg, acfg)
    g_w = VALUE_AND_GRAD(merged, None, tokens, mask, cfg, None)[1][0]["layers"]
    for i, layer in adapters["layers"].items():
        for group, mods in layer.items():
            for name, leaf in mods.items():
                # chain rule through W = W0 + s * A.T @ B.T, in numpy
                gw = np.asarray(g_w[group][name][int(i)])  # [in, out]
                A, B = np.asarray(leaf["A"]), np.asarray(leaf["B"])
                got = g_adapters["layers"][i][group][name]
                np.testing.assert_allclose(got["A"], acfg.scale * B.T @ gw.T, rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(got["B"], acfg.scale * gw.T @ A.T, rtol=1e-5, atol=1e-5)


def test_adapter_paths_are_validated(stories_jax):
    cfg, base = stories_jax
    tokens, mask = _batch(cfg.vocab_size, 1, 8, "none")
    leaf = {"A": jnp.zeros((2, 64)), "B": jnp.zeros((64, 2))}
    with pytest.raises(ValueError, match=r"layers\.9"):
        llama.apply(
            base,
            {"layers": {"9": {"attn": {"q_proj": leaf}}}},
            tokens,
            mask,
            cfg=cfg,
            adapter_cfg=LORA_QV,
        )
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.qq_proj"):
        llama.apply(
            base,
            {"layers": {"0": {"attn": {"qq_proj": leaf}}}},
            tokens,
            mask,
            cfg=cfg,
            adapter_cfg=LORA_QV,
        )
    with pytest.raises(ValueError, match="adapter_cfg is None"):
        llama.apply(base, {"layers": {"0": {"attn": {"q_proj": leaf}}}}, tokens, mask, cfg=cfg)


def _key_probe_kind() -> list:
    """A test kind that reports the dropout key it receives (via a debug callback)."""
    seen: list[tuple] = []

    def record(k):
        seen.append(tuple(np.asarray(k).ravel().tolist()))

    def apply(leaf, x, cfg, key):
        if key is None:
            seen.append(None)
        else:
            typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
            jax.debug.callback(record, jax.random.key_data(key) if typed else key)
        return jnp.zeros((*x.shape[:-1], leaf["out"].shape[0]), x.dtype)

    register_kind(AdapterKind(name="_test_key_probe", init=None, apply=apply, delta_weight=None))
    return seen


def test_dropout_keys_differ_per_layer_and_module(stories_jax):
    cfg, base = stories_jax
    seen = _key_probe_kind()
    acfg = AdapterConfig(kind="_test_key_probe", targets="qv", dropout=0.1)
    dq = cfg.num_heads * cfg.head_dim
    dkv = cfg.num_kv_heads * cfg.head_dim
    adapters = {
        "layers": {
            str(i): {"attn": {"q_proj": {"out": jnp.zeros(dq)}, "v_proj": {"out": jnp.zeros(dkv)}}}
            for i in range(cfg.num_layers)
        }
    }
    tokens, mask = _batch(cfg.vocab_size, 1, 8, "none")
    llama.apply(base, adapters, tokens, mask, cfg=cfg, adapter_cfg=acfg)
    assert seen and all(k is None for k in seen)  # eval: no key
    seen.clear()
    out = llama.apply(
        base, adapters, tokens, mask, cfg=cfg, adapter_cfg=acfg, dropout_key=jax.random.PRNGKey(3)
    )
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert len(seen) == 2 * cfg.num_layers and len(set(seen)) == 2 * cfg.num_layers


# ----------------------------------------------------------------------------- remat, bf16


@pytest.mark.parametrize("remat", [True, "layer", "dots_saveable"])
def test_remat_gives_identical_values_and_grads(stories_jax, remat):
    cfg, base = stories_jax
    adapters = _nonzero_lora(cfg, LORA_QV, seed=5)
    tokens, mask = _batch(cfg.vocab_size, 2, 16, "right", seed=3)
    v0, g0 = VALUE_AND_GRAD(base, adapters, tokens, mask, cfg, LORA_QV)
    v1, g1 = VALUE_AND_GRAD(base, adapters, tokens, mask, cfg, LORA_QV, remat=remat)
    # equal up to float reassociation (XLA fuses the recomputed layer differently)
    np.testing.assert_allclose(v0, v1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g0, g1)


def test_unknown_remat_policy_is_one_line(stories_jax):
    cfg, base = stories_jax
    tokens, mask = _batch(cfg.vocab_size, 1, 8, "none")
    with pytest.raises(ValueError, match="remat='sometimes' is not allowed; allowed: none, layer"):
        llama.apply(base, None, tokens, mask, cfg=cfg, remat="sometimes")


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_bf16_compute_is_close(stories_jax, param_dtype):
    cfg, base = stories_jax
    tokens, mask = _batch(cfg.vocab_size, 2, 32, "left", seed=4)
    ref = np.asarray(FWD(base, None, tokens, mask, cfg=cfg))
    base_p = jax.tree.map(lambda x: jnp.asarray(x, param_dtype), base)
    ours = FWD(base_p, None, tokens, mask, cfg=cfg, compute_dtype=jnp.bfloat16)
    assert ours.dtype == jnp.float32
    err = np.abs(np.asarray(ours) - ref)[mask == 1]
    assert np.isfinite(err).all() and err.mean() < 0.1 and err.max() < 1.0
    agree = (np.asarray(ours).argmax(-1) == ref.argmax(-1))[mask == 1].mean()
    assert agree > 0.9


# ----------------------------------------------------------------------------- KV cache

CACHED = jax.jit(llama.apply_with_cache, static_argnames=("cfg", "adapter_cfg", "compute_dtype"))


@pytest.mark.parametrize("use_lora", [False, True], ids=["base", "lora"])
def test_kv_cache_decoding_equals_full_forward(stories_jax, use_lora):
    cfg, base = stories_jax
    acfg = LORA_QV if use_lora else None
    adapters = _nonzero_lora(cfg, LORA_QV, seed=7) if use_lora else None
    prompt, pmask = _batch(cfg.vocab_size, 3, 10, "left", seed=5)
    steps = np.random.default_rng(6).integers(3, cfg.vocab_size, (3, 12)).astype(np.int32)
    tokens = np.concatenate([prompt, steps], axis=1)
    mask = np.concatenate([pmask, np.ones_like(steps)], axis=1)
    full = np.asarray(FWD(base, adapters, tokens, mask, cfg=cfg, adapter_cfg=acfg))

    cache = llama.init_cache(cfg, 3, tokens.shape[1] + 2)
    # prefill in two chunks, then one token per step
    got = []
    for lo, hi in [(0, 6), (6, 10)] + [(t, t + 1) for t in range(10, 22)]:
        logits, cache = CACHED(
            base, adapters, tokens[:, lo:hi], mask[:, lo:hi], cache, cfg=cfg, adapter_cfg=acfg
        )
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    assert _max_err(got, full, mask) <= TOL
    assert int(cache["index"]) == 22
    np.testing.assert_array_equal(cache["pos"], mask.sum(1))


# ----------------------------------------------------------------------------- loss


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
    tokens = rng.integers(0, 7, (2, 5))
    loss_mask = np.array([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    lp = _np_log_softmax(logits)
    nll = -np.take_along_axis(lp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(token_nll(logits, tokens), nll, rtol=1e-5)
    # hand count: row 0 counts tokens 2,3 (predicted from positions 1,2); row 1 counts 1..4
    total, n = lm_loss(logits, tokens, loss_mask)
    want = nll[0, 1] + nll[0, 2] + nll[1].sum()
    assert float(n) == 6.0
    np.testing.assert_allclose(total, want, rtol=1e-5)
    per_ex, counts = sequence_nll(logits, tokens, loss_mask)
    np.testing.assert_allclose(per_ex, [nll[0, 1] + nll[0, 2], nll[1].sum()], rtol=1e-5)
    np.testing.assert_array_equal(counts, [2, 4])


def test_loss_matches_hf_on_stories(stories_jax, stories_torch):
    """Our mean NLL on stories260K equals HF's own ``labels=`` loss (which shifts internally)."""
    cfg, base = stories_jax
    tokens, mask = _batch(cfg.vocab_size, 2, 32, "none", seed=8)
    total, n = lm_loss(FWD(base, None, tokens, mask, cfg=cfg), tokens, mask)
    with torch.no_grad():
        ids = torch.tensor(tokens.astype(np.int64))
        ref = stories_torch(input_ids=ids, labels=ids).loss
    np.testing.assert_allclose(float(total / n), float(ref), rtol=1e-5)


def test_convert_loader_gives_the_same_base(stories_dir, stories_jax):
    """fedlora_jax.model.convert.load_hf_folder gives exactly the base the parity tests use."""
    convert = pytest.importorskip("fedlora_jax.model.convert")
    cfg, base = stories_jax
    cfg2, base2 = convert.load_hf_folder(stories_dir)
    assert cfg2 == cfg
    assert jax.tree.structure(base2) == jax.tree.structure(base)
    jax.tree.map(np.testing.assert_array_equal, base2, base)
