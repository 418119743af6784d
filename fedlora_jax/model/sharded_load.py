"""Load a HF safetensors folder straight into sharded device arrays: each process reads only the
index ranges its own devices hold.

``jax.make_array_from_callback`` asks for one index (a tuple of slices) per addressable device;
the callback maps it back to the per-layer HF tensors (our stacked leaf ``[L, in, out]`` is L
tensors ``(out, in)`` in the files, possibly spread over several shard files), memory-maps each
tensor and copies out only the requested block. A host therefore allocates at most one device's
block at a time, never a whole leaf, and never touches the bytes of shards it does not own
(untouched pages of the mapping are not read). Same validation and dtype rules as
``convert.load_hf_folder``; ``sharded_load`` of a folder equals ``load_hf_folder`` bitwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from fedlora_jax.model.config import LlamaConfig
from fedlora_jax.model.convert import (
    DTypeLike,
    ModelLoadError,
    _aligned_empty,
    _as_dtype,
    _Entry,
    _hf_entries,
    _Param,
    _put,
    _SafetensorsSource,
    check_no_extra,
    check_param,
    param_specs,
    read_hf_config,
)
from fedlora_jax.model.sharding import (
    DEFAULT_RULES,
    REPLICATE_LIMIT_BYTES,
    Rule,
    leaf_paths,
    shardings,
    unflatten_paths,
)

PyTree = Any
Index = tuple[slice, ...]


def _mapped(e: _Entry) -> np.ndarray:
    """A read-only memory map of one tensor (no bytes are read until sliced)."""
    try:
        return np.memmap(e.file, dtype=e.dtype, mode="r", offset=e.start, shape=e.shape)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{e.file}: cannot map tensor bytes ({err})") from None


def _copy_block(e: _Entry, index: Index, transpose: bool, dst: np.ndarray) -> None:
    """``dst[...] = our-layout block [index]`` of one HF tensor, straight from the file mapping."""
    m = _mapped(e)
    src = m[index[::-1]].T if transpose else m[index]  # HF stores linears (out, in)
    np.copyto(dst, src, casting="unsafe")  # the dtype cast, if any, happens here


def leaf_reader(
    p: _Param, entries: dict[str, _Entry], num_layers: int, dtype: np.dtype | None
) -> Callable[[Index], np.ndarray]:
    """``read(index) -> block`` for one base leaf, ``index`` a tuple of slices of its shape.

    The block is allocated once (64-byte aligned, so jax takes it without a staging copy) and
    filled tensor by tensor: a block spanning several layers reads each layer's part in place.
    """
    names = p.names(num_layers)
    dt = np.dtype(dtype or entries[names[0]].dtype)
    full = (num_layers, *p.shape) if p.per_layer else p.shape

    def read(index: Index) -> np.ndarray:
        shape = tuple(len(range(*s.indices(n))) for s, n in zip(index, full, strict=True))
        out = _aligned_empty(shape, dt)
        if not p.per_layer:
            _copy_block(entries[names[0]], index, p.transpose, out)
            return out
        for j, i in enumerate(range(*index[0].indices(num_layers))):
            _copy_block(entries[names[i]], index[1:], p.transpose, out[j])
        return out

    return read


def sharded_load(
    path: str | os.PathLike,
    mesh: Mesh,
    dtype: DTypeLike = None,
    rules: Sequence[Rule] = DEFAULT_RULES,
    replicate_limit_bytes: int = REPLICATE_LIMIT_BYTES,
    read_hook: Callable[[str, Index, np.ndarray], None] | None = None,
) -> tuple[LlamaConfig, PyTree]:
    """Load a HF LLaMA folder as a base pytree of global arrays sharded by ``rules`` on ``mesh``.

    Each process materialises only the blocks of its addressable devices. ``read_hook(path,
    index, block)`` sees every block read (tests measure with it).
    """
    folder = Path(path)
    cfg = read_hf_config(folder)
    entries = _hf_entries(folder)
    src = _SafetensorsSource(entries, str(folder))
    specs = param_specs(cfg)
    for p in specs:
        check_param(cfg, src, p)
    check_no_extra(cfg, src)
    dt = _as_dtype(dtype)
    shapes = {
        "/".join(p.path): jax.ShapeDtypeStruct(
            (cfg.num_layers, *p.shape) if p.per_layer else p.shape,
            dt or entries[p.names(cfg.num_layers)[0]].dtype,
        )
        for p in specs
    }
    flat_shardings = leaf_paths(
        shardings(unflatten_paths(shapes), mesh, rules, replicate_limit_bytes)
    )
    base: dict[str, Any] = {}
    for p in specs:
        key = "/".join(p.path)
        read = leaf_reader(p, entries, cfg.num_layers, dt)

        def callback(index: Index, read: Callable = read, key: str = key) -> np.ndarray:
            block = read(index)
            if read_hook is not None:
                read_hook(key, index, block)
            return block

        arr = jax.make_array_from_callback(shapes[key].shape, flat_shardings[key], callback)
        _put(base, p.path, arr)
    return cfg, base
