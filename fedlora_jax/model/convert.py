"""Checkpoint files <-> the base-weights pytree of docs/internals.md.

Reads Hugging Face folders (``config.json`` + ``model.safetensors`` or a sharded
``model.safetensors.index.json``; f32/f16/bf16) and llama.cpp GGUF files (anything ``gguf`` can
dequantise), and writes HF folders back. Loading streams one tensor at a time into a preallocated
host array per stacked leaf, then moves that leaf to the device and frees it, so peak host memory
is at most one model + one stacked leaf + one tensor (CPU), or one leaf + one tensor when the model
lives on an accelerator. (A donated in-place device update was tried: XLA:CPU copies the whole
stack on each bf16 update, which is slower and no smaller.)
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from fedlora_jax.model.config import LlamaConfig

PyTree = Any
DTypeLike = Any  # None, a dtype name ("bfloat16") or a numpy/jax dtype

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_ALLOWED_DTYPES = ("float32", "bfloat16", "float16")
# Tensors some exporters add that carry no weights (recomputed by the model).
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


class ModelLoadError(ValueError):
    """A checkpoint cannot be loaded or saved; the message names the file and what to do."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """A model folder, file or shard does not exist."""


class UnsupportedArchitectureError(ModelLoadError):
    """The checkpoint is not a LLaMA-family model this library implements."""


class TensorShapeError(ModelLoadError):
    """A tensor's shape disagrees with the one the config implies."""


class MissingTensorError(ModelLoadError):
    """A tensor the config requires is absent from the checkpoint."""


# --------------------------------------------------------------------------------------------
# The name/layout map between HF tensors and base leaves (single source of truth for both ways).


@dataclass(frozen=True)
class _Param:
    """One base leaf: its path, HF name (``{i}`` = layer), per-layer shape (ours) and layout."""

    path: tuple[str, ...]
    hf_name: str
    shape: tuple[int, ...]
    transpose: bool  # HF stores nn.Linear weights (out, in); we store (in, out)
    per_layer: bool

    def hf_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape)) if self.transpose else self.shape

    def names(self, num_layers: int) -> list[str]:
        if not self.per_layer:
            return [self.hf_name]
        return [self.hf_name.format(i=i) for i in range(num_layers)]


def param_specs(cfg: LlamaConfig) -> list[_Param]:
    """Every base leaf for ``cfg`` in the layout of docs/internals.md."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    pre = "model.layers.{i}."
    specs = [
        _Param(("embed",), "model.embed_tokens.weight", (cfg.vocab_size, d), False, False),
        _Param(("layers", "input_norm"), pre + "input_layernorm.weight", (d,), False, True),
        _Param(("layers", "attn", "q_proj"), pre + "self_attn.q_proj.weight", (d, q), True, True),
        _Param(("layers", "attn", "k_proj"), pre + "self_attn.k_proj.weight", (d, kv), True, True),
        _Param(("layers", "attn", "v_proj"), pre + "self_attn.v_proj.weight", (d, kv), True, True),
        _Param(("layers", "attn", "o_proj"), pre + "self_attn.o_proj.weight", (q, d), True, True),
        _Param(
            ("layers", "post_attn_norm"), pre + "post_attention_layernorm.weight", (d,), False, True
        ),
        _Param(("layers", "mlp", "gate_proj"), pre + "mlp.gate_proj.weight", (d, f), True, True),
        _Param(("layers", "mlp", "up_proj"), pre + "mlp.up_proj.weight", (d, f), True, True),
        _Param(("layers", "mlp", "down_proj"), pre + "mlp.down_proj.weight", (f, d), True, True),
        _Param(("norm",), "model.norm.weight", (d,), False, False),
    ]
    if not cfg.tie_word_embeddings:
        specs.append(_Param(("lm_head",), "lm_head.weight", (d, cfg.vocab_size), True, False))
    return specs


def _get(tree: PyTree, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _put(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _as_dtype(dtype: DTypeLike) -> np.dtype | None:
    if dtype is None:
        return None
    try:
        dt = np.dtype(jnp.dtype(dtype))
    except TypeError:
        dt = None
    if dt is None or dt.name not in _ALLOWED_DTYPES:
        raise ModelLoadError(
            f"dtype={dtype!r} is not supported; allowed: None (keep), {', '.join(_ALLOWED_DTYPES)}"
        )
    return dt


# --------------------------------------------------------------------------------------------
# Streaming assembly: any tensor source -> stacked base pytree.


class _Source(Protocol):
    where: str

    def names(self) -> set[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> np.dtype: ...
    def read(self, name: str) -> np.ndarray: ...


def _bits(x: np.ndarray) -> np.ndarray:
    """Same-width unsigned-int view: numpy copies those fast (bf16 has no native copy loop)."""
    return x.view(f"u{x.dtype.itemsize}")


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype, align: int = 64) -> np.ndarray:
    """An uninitialised array on a 64-byte boundary: jax then copies it to the device directly;
    from numpy's default (page + 16 B) it makes an extra aligned staging copy of the whole leaf."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _fill_layer(stack: np.ndarray, i: int, x: np.ndarray, transpose: bool) -> None:
    """stack[i] = x (transposed, cast to the stack's dtype) without an intermediate full copy."""
    x = x.astype(stack.dtype, copy=False)
    np.copyto(_bits(stack[i]), _bits(x).T if transpose else _bits(x))


def check_param(cfg: LlamaConfig, src: _Source, p: _Param) -> list[str]:
    """The HF tensor names of one base leaf, each present with the shape the config implies."""
    present = src.names()
    names = p.names(cfg.num_layers)
    missing = [n for n in names if n not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MissingTensorError(
            f"{src.where}: tensor {missing[0]!r}{more} is missing; the config needs it "
            f"(num_hidden_layers={cfg.num_layers}, tie_word_embeddings="
            f"{cfg.tie_word_embeddings})"
        )
    for n in names:
        if src.shape(n) != p.hf_shape():
            raise TensorShapeError(
                f"{src.where}: tensor {n!r} has shape {list(src.shape(n))}, but the config "
                f"implies {list(p.hf_shape())}"
            )
    return names


def check_no_extra(cfg: LlamaConfig, src: _Source) -> None:
    """Nothing in the source beyond what ``param_specs`` reads (and ignorable exporter extras)."""
    used = {n for p in param_specs(cfg) for n in p.names(cfg.num_layers)}
    extra = sorted(
        n
        for n in src.names() - used
        if not _IGNORED.fullmatch(n) and not (n == "lm_head.weight" and cfg.tie_word_embeddings)
    )
    if extra:
        raise UnsupportedArchitectureError(
            f"{src.where}: unexpected tensor(s) {extra[:3]}{' ...' if len(extra) > 3 else ''}; "
            "a plain LLaMA (no biases) has only embed/attn/mlp/norm weights"
        )


def _assemble(cfg: LlamaConfig, src: _Source, dtype: np.dtype | None) -> PyTree:
    base: dict[str, Any] = {}
    for p in param_specs(cfg):
        names = check_param(cfg, src, p)
        host = _aligned_empty((len(names), *p.shape), np.dtype(dtype or src.dtype(names[0])))
        for i, n in enumerate(names):
            _fill_layer(host, i, src.read(n), p.transpose)
        # One stacked leaf at a time goes to the device and its host copy is freed at once.
        _put(base, p.path, jnp.asarray(host if p.per_layer else host[0]))
        del host
    check_no_extra(cfg, src)
    return base


# --------------------------------------------------------------------------------------------
# Hugging Face safetensors folders.


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def _read_safetensors_header(path: Path) -> dict[str, _Entry]:
    """Parse the header (u64 length + JSON) without touching the tensor data."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(path.stat().st_size - 8, 100 * 2**20):  # the format caps headers at 100 MB
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _ST_DTYPES:
                raise ModelLoadError(
                    f"{path}: tensor {name!r} has dtype {info['dtype']}; supported: "
                    f"{', '.join(_ST_DTYPES)} (quantised safetensors are not supported)"
                )
            start, end = info["data_offsets"]
            entries[name] = _Entry(
                path, _ST_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + start, end - start
            )
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError) as e:
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"{path}: not a readable safetensors file ({e!r})") from None
    return entries


class _SafetensorsSource:
    def __init__(self, entries: dict[str, _Entry], where: str):
        self.entries, self.where = entries, where

    def names(self) -> set[str]:
        return set(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def dtype(self, name: str) -> np.dtype:
        return self.entries[name].dtype

    def read(self, name: str) -> np.ndarray:
        """Read the raw bytes into a fresh array (works for bf16, which numpy lacks natively)."""
        e = self.entries[name]
        out = np.empty(e.shape, e.dtype)
        if out.nbytes != e.nbytes:
            raise ModelLoadError(f"{e.file}: tensor {name!r} byte range does not match its shape")
        with open(e.file, "rb") as f:
            f.seek(e.start)
            if f.readinto(out.reshape(-1).view(np.uint8)) != e.nbytes:
                raise ModelLoadError(f"{e.file}: truncated while reading tensor {name!r}")
        return out


def read_hf_config(folder: str | os.PathLike) -> LlamaConfig:
    """The architecture from ``folder/config.json``, with one-line errors for bad files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelNotFoundError(
            f"{folder}: no such model folder; pass a HF folder (config.json + model.safetensors), "
            "a hub id or an alias (run scripts/fetch_model.py --list)"
        )
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{folder}: no {CONFIG_FILE} here; is this a HF model folder?")
    try:
        d = json.loads(path.read_text())
    except ValueError as e:
        raise ModelLoadError(f"{path}: invalid JSON ({e})") from None
    return config_from_hf_dict(d, str(path))


def config_from_hf_dict(d: dict[str, Any], source: str) -> LlamaConfig:
    """``LlamaConfig.from_hf_dict`` plus the checks it leaves to loaders, as our error types."""
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key):
            raise UnsupportedArchitectureError(f"{source}: {key}=true is not supported")
    if d.get("hidden_act", "silu") != "silu":
        raise UnsupportedArchitectureError(
            f"{source}: hidden_act={d['hidden_act']!r} is not supported; supported: silu"
        )
    try:
        return LlamaConfig.from_hf_dict(d, source)
    except KeyError as e:
        raise ModelLoadError(f"{source}: missing key {e.args[0]!r}") from None
    except ValueError as e:
        raise UnsupportedArchitectureError(str(e)) from None


def _hf_entries(folder: Path) -> dict[str, _Entry]:
    index, single = folder / INDEX_FILE, folder / WEIGHTS_FILE
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({e!r})") from None
        entries: dict[str, _Entry] = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise ModelNotFoundError(f"{index}: shard {shard!r} listed but not in {folder}")
            entries.update(_read_safetensors_header(folder / shard))
        lost = sorted(n for n in weight_map if n not in entries)
        if lost:
            raise MissingTensorError(f"{index}: tensor {lost[0]!r} is not in its shard")
        return entries
    if single.is_file():
        return _read_safetensors_header(single)
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".gguf"))
    hint = (
        f" (found {others}; convert with scripts/convert_checkpoint.py for .gguf, or "
        "re-save PyTorch .bin with transformers' save_pretrained)"
        if others
        else ""
    )
    raise ModelNotFoundError(f"{folder}: found neither {WEIGHTS_FILE} nor {INDEX_FILE}{hint}")


def load_hf_folder(path: str | os.PathLike, dtype: DTypeLike = None) -> tuple[LlamaConfig, PyTree]:
    """Load a HF LLaMA folder; ``dtype`` None keeps each tensor's file dtype, else casts."""
    folder = Path(path)
    cfg = read_hf_config(folder)
    entries = _hf_entries(folder)
    return cfg, _assemble(cfg, _SafetensorsSource(entries, str(folder)), _as_dtype(dtype))


def _write_safetensors(path: Path, tensors: list[tuple[str, Any, bool, np.dtype]]) -> None:
    """Write (name, array-producer, transpose, dtype) tensors one at a time (no full copy)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, get, transpose, dt in tensors:
        shape = get.shape[::-1] if transpose else get.shape
        nbytes = math.prod(shape) * dt.itemsize
        header[name] = {
            "dtype": _ST_NAMES[dt],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns tensor data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, get, transpose, dt in tensors:
            x = np.asarray(get)
            x = np.ascontiguousarray((x.T if transpose else x).astype(dt, copy=False))
            f.write(x.reshape(-1).view(np.uint8).data)


class _LayerSlice:
    """A lazy view of ``leaf[i]`` so the writer pulls one layer to the host at a time."""

    def __init__(self, leaf: Any, i: int):
        self.leaf, self.i, self.shape = leaf, i, tuple(leaf.shape[1:])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self.leaf[self.i], dtype=dtype)


def save_hf_folder(
    cfg: LlamaConfig,
    base: PyTree,
    path: str | os.PathLike,
    dtype: DTypeLike = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write ``base`` as a HF folder (config.json + safetensors, sharded past max_shard_bytes).

    ``dtype`` None keeps each leaf's dtype, so load(save(base)) is bitwise equal to ``base``.
    """
    out = Path(path)
    out_dtype = _as_dtype(dtype)
    tensors: list[tuple[str, Any, bool, np.dtype]] = []
    for p in param_specs(cfg):
        try:
            leaf = _get(base, p.path)
        except (KeyError, TypeError):
            raise MissingTensorError(f"base pytree has no leaf {'/'.join(p.path)}") from None
        want = (cfg.num_layers, *p.shape) if p.per_layer else p.shape
        if tuple(leaf.shape) != want:
            raise TensorShapeError(
                f"base leaf {'/'.join(p.path)} has shape {list(leaf.shape)}, but the config "
                f"implies {list(want)}"
            )
        dt = out_dtype or np.dtype(leaf.dtype)
        if dt not in _ST_NAMES:
            raise ModelLoadError(f"base leaf {'/'.join(p.path)} has unsupported dtype {dt}")
        parts = [_LayerSlice(leaf, i) for i in range(cfg.num_layers)] if p.per_layer else [leaf]
        tensors += [
            (n, x, p.transpose, dt) for n, x in zip(p.names(cfg.num_layers), parts, strict=True)
        ]
    shards = list(_split(tensors, max_shard_bytes))
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        _write_safetensors(out / WEIGHTS_FILE, shards[0])
    else:
        weight_map, total = {}, 0
        for k, shard in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(out / fname, shard)
            for name, x, _, dt in shard:
                weight_map[name] = fname
                total += math.prod(x.shape) * dt.itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    hf = cfg.to_hf_dict()
    dts = {dt for *_, dt in tensors}
    hf["dtype"] = dts.pop().name if len(dts) == 1 else "float32"
    (out / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
    return out


def _split(tensors: list, max_bytes: int) -> Iterator[list]:
    shard: list = []
    size = 0
    for t in tensors:
        nbytes = math.prod(t[1].shape) * t[3].itemsize
        if shard and size + nbytes > max_bytes:
            yield shard
            shard, size = [], 0
        shard.append(t)
        size += nbytes
    yield shard


# --------------------------------------------------------------------------------------------
# llama.cpp GGUF.

_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def _hf_name_of_gguf(name: str) -> str:
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    m = _GGUF_BLOCK.fullmatch(name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.weight"
    return name  # unknown: reported as an unexpected tensor by _assemble


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert-time Q/K row permutation (interleaved -> HF rotate-half).

    llama.cpp stores rows of head h as pairs (2j, 2j+1) interleaved; HF keeps the first and second
    halves of each head separate. ``w`` is HF layout (out, in).
    """
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _gguf_field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    if isinstance(value, float):  # GGUF stores f32: take its shortest decimal (1e-05, not 9.99e-6)
        return float(str(np.float32(value)))
    return value


def gguf_config(reader: Any, where: str) -> LlamaConfig:
    """A LlamaConfig from GGUF metadata (``{arch}.block_count`` etc.)."""
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedArchitectureError(
            f"{where}: GGUF architecture {arch!r} is not supported; supported: llama"
        )
    if "rope_freqs.weight" in {t.name for t in reader.tensors}:
        raise UnsupportedArchitectureError(
            f"{where}: per-frequency RoPE factors (rope_freqs.weight, Llama-3.1 style) are not "
            "supported from GGUF; load the HF safetensors release instead"
        )

    def need(key: str) -> Any:
        value = _gguf_field(reader, f"llama.{key}")
        if value is None:
            raise ModelLoadError(f"{where}: GGUF metadata key 'llama.{key}' is missing")
        return value

    heads = need("attention.head_count")
    hidden = need("embedding_length")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = _gguf_field(reader, "llama.vocab_size") or (int(embd.shape[-1]) if embd else None)
    rope: dict[str, Any] = {}
    scaling = _gguf_field(reader, "llama.rope.scaling.type", "none")
    if scaling != "none":
        rope = {"rope_type": scaling, "factor": _gguf_field(reader, "llama.rope.scaling.factor")}
    d = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _gguf_field(reader, "llama.attention.head_count_kv", heads),
        "head_dim": _gguf_field(reader, "llama.attention.key_length", hidden // heads),
        "rms_norm_eps": _gguf_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": _gguf_field(reader, "llama.rope.freq_base", 10000.0),
        "rope_scaling": rope or None,
        "max_position_embeddings": _gguf_field(reader, "llama.context_length", 2048),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "bos_token_id": _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _gguf_field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _gguf_field(reader, "tokenizer.ggml.padding_token_id"),
    }
    return config_from_hf_dict(d, where)


class _GGUFSource:
    def __init__(self, reader: Any, cfg: LlamaConfig, where: str):
        self.where, self.cfg = where, cfg
        self.tensors = {_hf_name_of_gguf(t.name): t for t in reader.tensors}

    def names(self) -> set[str]:
        return set(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self.tensors[name].shape))  # GGUF lists ne0 first

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(np.float32)  # dequantised values are exact in float32

    def read(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = self.tensors[name]
        w = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(self.shape(name))
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, self.cfg.num_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, self.cfg.num_kv_heads)
        return w


def load_gguf(path: str | os.PathLike, dtype: DTypeLike = None) -> tuple[LlamaConfig, PyTree]:
    """Load a llama.cpp GGUF LLaMA: dequantise tensor by tensor (float32 unless ``dtype``)."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path}: no such GGUF file (for SmolLM2 run: python scripts/fetch_model.py "
            "smollm2-135m)"
        )
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({e})") from None
    cfg = gguf_config(reader, str(path))
    return cfg, _assemble(cfg, _GGUFSource(reader, cfg, str(path)), _as_dtype(dtype))
