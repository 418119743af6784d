"""Checkpoint loading/saving (model/convert.py) against independent readers and writers:
safetensors' own numpy/torch I/O, a hand-built GGUF with llama.cpp's Q/K permutation, and
transformers' GGUF loader for the real SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from fedlora_jax.model.config import LlamaConfig
from fedlora_jax.model.convert import (
    MissingTensorError,
    ModelLoadError,
    ModelNotFoundError,
    TensorShapeError,
    UnsupportedArchitectureError,
    load_gguf,
    load_hf_folder,
    save_hf_folder,
    unpermute_qk,
)

BF16 = np.dtype(ml_dtypes.bfloat16)
TINY = LlamaConfig(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=24,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=4,
    rope_theta=500.0,
    tie_word_embeddings=False,
    max_position_embeddings=64,
)
LINEARS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def hf_tensors(cfg: LlamaConfig, dtype: np.dtype, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights under HF names, in HF (out, in) layout."""
    rng = np.random.default_rng(seed)
    d, f, q, kv = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    )
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    per = {
        "input_layernorm": (d,),
        "post_attention_layernorm": (d,),
        "q_proj": (q, d),
        "k_proj": (kv, d),
        "v_proj": (kv, d),
        "o_proj": (d, q),
        "gate_proj": (f, d),
        "up_proj": (f, d),
        "down_proj": (d, f),
    }
    for i in range(cfg.num_layers):
        for m, shape in per.items():
            shapes[f"model.layers.{i}.{LINEARS[m] + '.' if m in LINEARS else ''}{m}.weight"] = shape
    return {k: rng.standard_normal(s).astype(np.float32).astype(dtype) for k, s in shapes.items()}


def hf_view(cfg: LlamaConfig, base) -> dict[str, np.ndarray]:
    """Our base pytree rendered under HF names/layout, written from docs/internals.md."""
    out = {
        "model.embed_tokens.weight": np.asarray(base["embed"]),
        "model.norm.weight": np.asarray(base["norm"]),
    }
    if "lm_head" in base:
        out["lm_head.weight"] = np.asarray(base["lm_head"]).T
    lay = base["layers"]
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        out[pre + "input_layernorm.weight"] = np.asarray(lay["input_norm"][i])
        out[pre + "post_attention_layernorm.weight"] = np.asarray(lay["post_attn_norm"][i])
        for m, group in LINEARS.items():
            ours = lay["attn" if group == "self_attn" else "mlp"][m]
            out[f"{pre}{group}.{m}.weight"] = np.asarray(ours[i]).T
    return out


def assert_bitwise(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        bits = f"u{want[k].dtype.itemsize}"
        assert np.array_equal(np.ascontiguousarray(got[k]).view(bits), want[k].view(bits)), k


def write_folder(path: Path, cfg: LlamaConfig, shards: list[dict[str, np.ndarray]]) -> Path:
    """An HF folder written by safetensors' torch writer (independent of ours); bf16 supported."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    def to_torch(x: np.ndarray):
        if x.dtype == BF16:
            return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(x)

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    if len(shards) == 1:
        save_file({k: to_torch(v) for k, v in shards[0].items()}, str(path / "model.safetensors"))
        return path
    weight_map = {}
    for j, shard in enumerate(shards):
        name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: to_torch(v) for k, v in shard.items()}, str(path / name))
        weight_map.update(dict.fromkeys(shard, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


@pytest.fixture(scope="module")
def stories(stories_dir: Path):
    return load_hf_folder(stories_dir)


def test_stories_loads_to_the_documented_layout(stories, stories_dir: Path) -> None:
    cfg, base = stories
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (5, 64, 8, 4)
    assert cfg.tie_word_embeddings and "lm_head" not in base
    assert base["layers"]["attn"]["k_proj"].shape == (5, 64, 32)
    assert base["layers"]["mlp"]["down_proj"].shape == (5, 172, 64)
    assert_bitwise(hf_view(cfg, base), load_file(str(stories_dir / "model.safetensors")))


def test_stories_round_trip_is_bitwise(stories, stories_dir: Path, tmp_path: Path) -> None:
    cfg, base = stories
    save_hf_folder(cfg, base, tmp_path)
    # the written file, read by safetensors itself, holds exactly the original tensors
    assert_bitwise(
        load_file(str(tmp_path / "model.safetensors")),
        load_file(str(stories_dir / "model.safetensors")),
    )
    cfg2, base2 = load_hf_folder(tmp_path)
    assert cfg2 == cfg
    assert_bitwise(hf_view(cfg2, base2), hf_view(cfg, base))


def test_export_loads_in_transformers(stories, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg, base = stories
    save_hf_folder(cfg, base, tmp_path)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype="float32")
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 4
    sd = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert_bitwise(sd, hf_view(cfg, base))


def test_bf16_untied_sharded_folder_loads_and_round_trips(tmp_path: Path) -> None:
    tensors = hf_tensors(TINY, BF16)
    names = sorted(tensors)
    shards = [{k: tensors[k] for k in names[:9]}, {k: tensors[k] for k in names[9:]}]
    folder = write_folder(tmp_path / "src", TINY, shards)
    cfg, base = load_hf_folder(folder)
    assert cfg == TINY
    assert {x.dtype for x in jax.tree.leaves(base)} == {BF16}
    assert base["lm_head"].shape == (16, 32)
    assert_bitwise(hf_view(cfg, base), tensors)
    # our sharded export: several files + index, read back bit for bit by torch's reader
    out = save_hf_folder(cfg, base, tmp_path / "out", max_shard_bytes=2048)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    import torch
    from safetensors.torch import load_file as torch_load

    back = {}
    for f in files:
        back.update(
            {k: v.view(torch.int16).numpy().view(BF16) for k, v in torch_load(str(out / f)).items()}
        )
    assert_bitwise(back, tensors)
    assert_bitwise(hf_view(cfg, load_hf_folder(out)[1]), tensors)


def test_dtype_argument_casts_like_numpy(stories, stories_dir: Path) -> None:
    cfg, base16 = load_hf_folder(stories_dir, dtype="bfloat16")
    want = {k: v.astype(BF16) for k, v in load_file(str(stories_dir / "model.safetensors")).items()}
    assert_bitwise(hf_view(cfg, base16), want)
    with pytest.raises(ModelLoadError, match=r"dtype='int8' is not supported; allowed: .*bfloat16"):
        load_hf_folder(stories_dir, dtype="int8")


def test_save_can_cast_and_rejects_a_wrong_pytree(stories, tmp_path: Path) -> None:
    cfg, base = stories
    save_hf_folder(cfg, base, tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(load_hf_folder(tmp_path)[1])} == {BF16}
    bad = jax.tree.map(lambda x: x, base)
    bad["layers"]["attn"]["q_proj"] = bad["layers"]["attn"]["q_proj"][:, :, :8]
    with pytest.raises(
        TensorShapeError,
        match=r"layers/attn/q_proj has shape \[5, 64, 8\], but "
        r"the config implies \[5, 64, 64\]",
    ):
        save_hf_folder(cfg, bad, tmp_path / "bad")


# ----------------------------------------------------------------------------------- errors


@pytest.fixture()
def tiny_folder(tmp_path: Path):
    tensors = hf_tensors(TINY, np.dtype(np.float32))
    return write_folder(tmp_path / "m", TINY, [tensors]), tensors


def test_missing_folder_and_files_say_where_and_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"nope: no such model folder.*fetch_model\.py"):
        load_hf_folder(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match=r"no config\.json here"):
        load_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(
        ModelNotFoundError,
        match=r"neither model\.safetensors nor "
        r"model\.safetensors\.index\.json "
        r"\(found \['pytorch_model\.bin'\]",
    ):
        load_hf_folder(tmp_path)
    assert issubclass(ModelNotFoundError, FileNotFoundError)


def test_missing_shard(tmp_path: Path) -> None:
    tensors = hf_tensors(TINY, np.dtype(np.float32))
    folder = write_folder(
        tmp_path, TINY, [dict(list(tensors.items())[:5]), dict(list(tensors.items())[5:])]
    )
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        ModelNotFoundError, match=r"shard 'model-00002-of-00002\.safetensors' listed"
    ):
        load_hf_folder(folder)


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (
            {"architectures": ["MistralForCausalLM"], "model_type": "mistral"},
            UnsupportedArchitectureError,
            r"unsupported architecture \['MistralForCausalLM'\]; "
            r"supported: LlamaForCausalLM",
        ),
        ({"attention_bias": True}, UnsupportedArchitectureError, r"attention_bias=true"),
        ({"hidden_act": "gelu"}, UnsupportedArchitectureError, r"hidden_act='gelu'.*silu"),
        ({"hidden_size": None}, ModelLoadError, r"config\.json: missing key 'hidden_size'"),
        (
            {"intermediate_size": 20},
            TensorShapeError,
            r"tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \[24, 16\], "
            r"but the config implies \[20, 16\]",
        ),
        (
            {"num_hidden_layers": 3},
            MissingTensorError,
            r"tensor 'model\.layers\.2\.input_layernorm\.weight' is missing",
        ),
        (
            {"num_hidden_layers": 1},
            UnsupportedArchitectureError,
            r"unexpected tensor\(s\) \['model\.layers\.1\.",
        ),
    ],
)
def test_config_errors(tiny_folder, edit, error, message) -> None:
    folder, _ = tiny_folder
    d = {**TINY.to_hf_dict(), **edit}
    d = {k: v for k, v in d.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(error, match=message):
        load_hf_folder(folder)


def test_missing_tensor_and_bad_files(tiny_folder) -> None:
    folder, tensors = tiny_folder
    del tensors["lm_head.weight"]
    write_folder(folder, TINY, [tensors])
    with pytest.raises(
        MissingTensorError,
        match=r"tensor 'lm_head\.weight' is missing.*"
        r"tie_word_embeddings=False",
    ):
        load_hf_folder(folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelLoadError, match=r"truncated while reading tensor"):
        load_hf_folder(folder)
    (folder / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: not a readable safetensors"):
        load_hf_folder(folder)
    (folder / "config.json").write_text("{oops")
    with pytest.raises(ModelLoadError, match=r"config\.json: invalid JSON"):
        load_hf_folder(folder)


# ------------------------------------------------------------------------------------- GGUF


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute`` (HF rotate-half -> interleaved)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def test_unpermute_inverts_llama_cpp_permute() -> None:
    w = np.arange(24 * 5, dtype=np.float32).reshape(24, 5)
    for heads in (1, 2, 3, 6):
        assert np.array_equal(unpermute_qk(llama_cpp_permute(w, heads), heads), w)
    # a hand-worked case: one head of 4 rows, interleaved order is (0, 2, 1, 3)
    assert np.array_equal(llama_cpp_permute(np.arange(4.0)[:, None], 1)[:, 0], [0, 2, 1, 3])


def write_gguf(
    path: Path, cfg: LlamaConfig, tensors: dict[str, np.ndarray], arch: str = "llama"
) -> Path:
    """A GGUF as llama.cpp's converter writes it: permuted q/k, GGUF names, llama.* metadata."""
    import gguf

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, x in tensors.items():
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            module = rest.removesuffix(".weight")
            if module == "self_attn.q_proj":
                x = llama_cpp_permute(x, cfg.num_heads)
            elif module == "self_attn.k_proj":
                x = llama_cpp_permute(x, cfg.num_kv_heads)
            gname = f"blk.{i}.{layer[module]}.weight"
        else:
            gname = names[name]
        w.add_tensor(gname, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_loads_config_and_unpermuted_weights(tmp_path: Path) -> None:
    tensors = hf_tensors(TINY, np.dtype(np.float32))
    cfg, base = load_gguf(write_gguf(tmp_path / "m.gguf", TINY, tensors))
    assert cfg == LlamaConfig(**{**TINY.__dict__, "bos_token_id": 1, "eos_token_id": 2})
    assert_bitwise(hf_view(cfg, base), tensors)


def test_gguf_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"no such GGUF file.*fetch_model\.py"):
        load_gguf(tmp_path / "missing.gguf")
    tensors = hf_tensors(TINY, np.dtype(np.float32))
    path = write_gguf(tmp_path / "q.gguf", TINY, tensors, arch="qwen2")
    with pytest.raises(
        UnsupportedArchitectureError,
        match=r"GGUF architecture 'qwen2' is not "
        r"supported; supported: llama",
    ):
        load_gguf(path)
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ModelLoadError, match=r"bad\.gguf: not a readable GGUF"):
        load_gguf(tmp_path / "bad.gguf")


# --------------------------------------------------------------------- real SmolLM2 GGUF


@pytest.fixture(scope="module")
def smol(smollm2_gguf: Path):
    return load_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def smol_hf(smollm2_gguf: Path):
    """transformers' own GGUF loading of the same file (~20 s; shared by the module)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype="float32"
    ).eval()


def test_smollm2_gguf_has_the_documented_architecture(smol) -> None:
    cfg, base = smol
    assert (
        cfg.num_layers,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.vocab_size,
    ) == (30, 576, 1536, 9, 3, 64, 49152)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.max_position_embeddings) == (1e5, 1e-5, 8192)
    assert cfg.tie_word_embeddings and (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    n_params = sum(x.size for x in jax.tree.leaves(base))
    assert n_params == 134_515_008  # transformers' count for this file (shared/data README)


def test_smollm2_weights_and_logits_match_transformers(smol, smol_hf) -> None:
    import torch

    from fedlora_jax.model.llama import apply

    cfg, base = smol
    sd = smol_hf.state_dict()
    for name in (
        "model.layers.7.self_attn.q_proj.weight",
        "model.layers.7.self_attn.k_proj.weight",
        "model.layers.29.mlp.down_proj.weight",
        "model.embed_tokens.weight",
    ):
        assert np.array_equal(hf_view_one(cfg, base, name), sd[name].numpy()), name
    tokens = np.array([[1, 504, 3575, 282, 4649, 314, 2683, 30]], np.int32)
    ours = np.asarray(apply(base, None, tokens, np.ones_like(tokens), cfg=cfg))
    with torch.no_grad():
        theirs = smol_hf(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    assert np.abs(ours - theirs).max() < 5e-4  # measured 6.5e-5 (logits up to 31)
    assert np.array_equal(ours.argmax(-1), theirs.argmax(-1))


def hf_view_one(cfg: LlamaConfig, base, name: str) -> np.ndarray:
    if name == "model.embed_tokens.weight":
        return np.asarray(base["embed"])
    _, _, i, group, module, _ = name.split(".")
    return np.asarray(base["layers"]["attn" if group == "self_attn" else "mlp"][module][int(i)]).T
