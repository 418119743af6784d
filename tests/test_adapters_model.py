"""Adapters inside the real model (stories260K), checked against PEFT on the HF torch model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from transformers import LlamaForCausalLM

from fedlora_jax.adapters import AdapterConfig, get_kind, init_adapters, merge_into_base
from fedlora_jax.adapters.base import get_path
from fedlora_jax.adapters.peft import export_peft, hf_module_name, load_peft
from fedlora_jax.adapters.tree import leaf_paths
from fedlora_jax.model import llama
from fedlora_jax.model.convert import load_hf_folder

TOL = 1e-4
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = AdapterConfig(kind="lora", r=4, alpha=8.0, targets="all-linear")
DECOMPOSED = AdapterConfig(kind="decomposed", r=4, alpha=8.0, targets="qv")

# One jitted forward for the whole module: each adapter structure compiles once.
_forward = jax.jit(llama.apply, static_argnames=("cfg", "adapter_cfg", "compute_dtype", "remat"))


@pytest.fixture(scope="module")
def loaded(stories_dir):
    return load_hf_folder(stories_dir)


@pytest.fixture(scope="module")
def tokens() -> tuple[np.ndarray, np.ndarray]:
    toks = np.random.default_rng(0).integers(3, 512, size=(2, 16)).astype(np.int32)
    mask = np.ones_like(toks)
    mask[1, 12:] = 0  # right padding on the second row
    return toks, mask


def _ours(loaded, tokens, adapters, adapter_cfg, base=None) -> np.ndarray:
    cfg, base0 = loaded
    toks, mask = tokens
    logits = _forward(
        base0 if base is None else base,
        adapters,
        toks,
        mask,
        cfg=cfg,
        adapter_cfg=adapter_cfg if adapters else None,
    )
    return np.asarray(logits)


def _hf(stories_dir) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()


def _torch_logits(model, tokens) -> np.ndarray:
    toks, mask = tokens
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(toks).long(), attention_mask=torch.from_numpy(mask).long()
        )
    return out.logits.numpy()


def _close(ours: np.ndarray, theirs: np.ndarray, mask: np.ndarray) -> None:
    real = mask.astype(bool)  # padded positions are never used
    np.testing.assert_allclose(ours[real], theirs[real], atol=TOL, rtol=0)


def _randomised(tree, key: int, scale: float = 0.1):
    """Non-zero values in every leaf (fresh LoRA has B = 0, which would hide bugs).

    0.1 moves the logits by ~10 while keeping them well conditioned (at 0.3 the adapted
    network amplifies fp32 rounding past 1e-3, in torch and in JAX alike).
    """
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(key), len(leaves))
    return jax.tree.unflatten(
        treedef, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )


@pytest.fixture(scope="module")
def lora_tree(loaded):
    return _randomised(init_adapters(jax.random.key(0), loaded[0], LORA), 1)


def test_lora_forward_matches_peft(loaded, tokens, lora_tree, stories_dir) -> None:
    model = peft.get_peft_model(
        _hf(stories_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR)
    ).eval()
    for path in leaf_paths(lora_tree):
        module = model.base_model.model.get_submodule(hf_module_name(path))
        leaf = get_path(lora_tree, path)
        module.lora_A["default"].weight.data = torch.tensor(np.asarray(leaf["A"]))
        module.lora_B["default"].weight.data = torch.tensor(np.asarray(leaf["B"]))
    theirs = _torch_logits(model, tokens)
    base_logits = _ours(loaded, tokens, None, None)
    assert np.abs(theirs - base_logits).max() > 100 * TOL  # the adapter really changes the output
    _close(_ours(loaded, tokens, lora_tree, LORA), theirs, tokens[1])


def test_lora_merge_equals_adapter_forward(loaded, tokens, lora_tree) -> None:
    merged = merge_into_base(loaded[1], lora_tree, LORA)
    _close(
        _ours(loaded, tokens, None, None, base=merged),
        _ours(loaded, tokens, lora_tree, LORA),
        tokens[1],
    )


def test_lora_export_loads_in_peft(loaded, tokens, lora_tree, stories_dir, tmp_path) -> None:
    export_peft(lora_tree, LORA, loaded[0], tmp_path)
    model = peft.PeftModel.from_pretrained(_hf(stories_dir), tmp_path).eval()
    _close(_ours(loaded, tokens, lora_tree, LORA), _torch_logits(model, tokens), tokens[1])


def test_load_peft_saved_by_peft(loaded, tokens, stories_dir, tmp_path) -> None:
    torch.manual_seed(0)
    model = peft.get_peft_model(
        _hf(stories_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR)
    ).eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.save_pretrained(tmp_path)
    tree, cfg = load_peft(tmp_path, loaded[0])
    assert cfg == LORA
    _close(_ours(loaded, tokens, tree, cfg), _torch_logits(model, tokens), tokens[1])


def test_decomposed_zero_b_m_gives_exact_base_logits(loaded, tokens) -> None:
    tree = init_adapters(jax.random.key(3), loaded[0], DECOMPOSED)
    np.testing.assert_array_equal(
        _ours(loaded, tokens, tree, DECOMPOSED), _ours(loaded, tokens, None, None)
    )


def test_decomposed_export_and_merge(loaded, tokens, stories_dir, tmp_path) -> None:
    tree = _randomised(init_adapters(jax.random.key(3), loaded[0], DECOMPOSED), 4)
    ours = _ours(loaded, tokens, tree, DECOMPOSED)
    assert np.abs(ours - _ours(loaded, tokens, None, None)).max() > 100 * TOL
    export_peft(tree, DECOMPOSED, loaded[0], tmp_path)
    model = peft.PeftModel.from_pretrained(_hf(stories_dir), tmp_path).eval()
    _close(ours, _torch_logits(model, tokens), tokens[1])
    merged = merge_into_base(loaded[1], tree, DECOMPOSED)
    _close(_ours(loaded, tokens, None, None, base=merged), ours, tokens[1])


def test_mixture_init_leaves_model_unchanged(loaded, tokens) -> None:
    cfg = AdapterConfig(kind="mixture", r=4, targets="qv")
    tree = init_adapters(jax.random.key(5), loaded[0], cfg)
    np.testing.assert_array_equal(
        _ours(loaded, tokens, tree, cfg), _ours(loaded, tokens, None, None)
    )


def test_dense_delta_merge_equals_forward(loaded, tokens) -> None:
    cfg = AdapterConfig(kind="dense_delta", targets=r"layers\.[0-4]\.mlp\.down_proj")
    tree = init_adapters(jax.random.key(6), loaded[0], cfg)
    leaf = get_path(tree, "layers.0.mlp.down_proj")
    assert not np.any(leaf["dW"])
    tree = _randomised(tree, 7, scale=0.05)
    merged = merge_into_base(loaded[1], tree, cfg)
    ours = _ours(loaded, tokens, tree, cfg)
    assert np.abs(ours - _ours(loaded, tokens, None, None)).max() > 100 * TOL
    _close(_ours(loaded, tokens, None, None, base=merged), ours, tokens[1])
    want = np.asarray(loaded[1]["layers"]["mlp"]["down_proj"][2]) + np.asarray(
        get_kind("dense_delta").delta_weight(get_path(tree, "layers.2.mlp.down_proj"), cfg)
    )
    np.testing.assert_array_equal(merged["layers"]["mlp"]["down_proj"][2], jnp.asarray(want))
