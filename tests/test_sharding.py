"""Partition rules and sharded loading (docs/scaling.md).

Rules are checked on shapes in this process; loading runs on 8 fake CPU devices in a worker
interpreter (tests/fake_devices.py) and is compared bitwise with the plain loader.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fake_devices import run_worker
from jax.sharding import PartitionSpec as P

from fedlora_jax.model.config import LlamaConfig
from fedlora_jax.model.convert import load_hf_folder, save_hf_folder
from fedlora_jax.model.sharding import (
    DEFAULT_RULES,
    REPLICATE,
    ShardingError,
    leaf_paths,
    partition_specs,
)

# Small but LLaMA-shaped; untied so lm_head exists; every matrix dim divides by 8.
CFG = LlamaConfig(
    vocab_size=4096,
    hidden_size=64,
    intermediate_size=256,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    tie_word_embeddings=False,
)


def _shapes(cfg: LlamaConfig = CFG, dtype: str = "float32") -> dict:
    from fedlora_jax.model.llama import init_random_base

    return jax.eval_shape(lambda: init_random_base(jax.random.PRNGKey(0), cfg, jnp.dtype(dtype)))


# ----------------------------------------------------------------------------- rules


def test_default_rules_split_every_large_leaf():
    specs = leaf_paths(partition_specs(_shapes(), {"clients": 2, "fsdp": 4}))
    assert specs == {
        "embed": P(None, "fsdp"),
        "lm_head": P("fsdp", None),
        "layers/attn/q_proj": P(None, "fsdp", None),
        "layers/attn/k_proj": P(None, "fsdp", None),
        "layers/attn/v_proj": P(None, "fsdp", None),
        "layers/attn/o_proj": P(None, None, "fsdp"),
        "layers/mlp/gate_proj": P(None, "fsdp", None),
        "layers/mlp/up_proj": P(None, "fsdp", None),
        "layers/mlp/down_proj": P(None, None, "fsdp"),
        "layers/input_norm": P(),
        "layers/post_attn_norm": P(),
        "norm": P(),
    }


def test_tensor_axis_is_used_when_the_mesh_has_it():
    specs = leaf_paths(partition_specs(_shapes(), {"fsdp": 2, "tensor": 4}))
    assert specs["layers/attn/q_proj"] == P(None, "fsdp", "tensor")
    assert specs["layers/mlp/down_proj"] == P(None, "tensor", "fsdp")
    assert specs["embed"] == P("tensor", "fsdp")


def test_leaf_without_rule_is_named():
    rules = tuple(r for r in DEFAULT_RULES if r[0] != r"layers/mlp/down_proj")
    with pytest.raises(ShardingError, match="'layers/mlp/down_proj'.*matches no partition rule"):
        partition_specs(_shapes(), {"fsdp": 4}, rules)


def test_large_leaf_is_not_replicated_silently():
    rules = ((r"embed", (None, None)),) + DEFAULT_RULES
    with pytest.raises(ShardingError, match="'embed'.*would be replicated"):
        partition_specs(_shapes(), {"fsdp": 4}, rules, replicate_limit_bytes=1024)
    explicit = ((r"embed", REPLICATE),) + DEFAULT_RULES
    specs = partition_specs(_shapes(), {"fsdp": 4}, explicit, replicate_limit_bytes=1024)
    assert specs["embed"] == P()


def test_indivisible_dim_and_wrong_rank_are_errors():
    with pytest.raises(ShardingError, match="'embed'.*size 64 does not divide.*3 ways"):
        partition_specs(_shapes(), {"fsdp": 3})
    rules = ((r"norm", (None, None)),) + DEFAULT_RULES
    with pytest.raises(ShardingError, match="2 axes.*'norm' has 1 dims"):
        partition_specs(_shapes(), {"fsdp": 4}, rules)


# ----------------------------------------------------------------------------- sharded loading


def _save_random(folder: Path, dtype: str) -> None:
    from fedlora_jax.model.llama import init_random_base

    base = init_random_base(jax.random.PRNGKey(3), CFG, jnp.dtype(dtype))
    save_hf_folder(CFG, base, folder, max_shard_bytes=200_000)


def _worker_load(folder: str, mesh_axes: dict, dtype: str | None) -> dict:
    """On 8 fake devices: sharded load equals the plain load bitwise; per-block/peak bytes."""
    from fedlora_jax.model.sharded_load import sharded_load

    assert jax.device_count() == 8
    mesh = jax.make_mesh(
        tuple(mesh_axes.values()),
        tuple(mesh_axes),
        axis_types=(jax.sharding.AxisType.Auto,) * len(mesh_axes),
    )
    blocks: dict[str, int] = {}
    windows: list[int] = []  # host bytes allocated between one block's end and the next's
    tracemalloc.start()
    base_line = [tracemalloc.get_traced_memory()[0]]

    def hook(path: str, index: tuple, block: np.ndarray) -> None:
        blocks[path] = max(blocks.get(path, 0), block.nbytes)
        current, peak = tracemalloc.get_traced_memory()
        windows.append(peak - base_line[0])
        tracemalloc.reset_peak()
        base_line[0] = current

    cfg, base = sharded_load(folder, mesh, dtype, read_hook=hook)
    tracemalloc.stop()
    _, plain = load_hf_folder(folder, dtype)
    sharded, ref = leaf_paths(base), leaf_paths(plain)
    assert sharded.keys() == ref.keys()
    leaf_bytes = {}
    for path, arr in sharded.items():
        want = np.asarray(ref[path])
        got = np.asarray(arr)
        assert got.dtype == want.dtype, path
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8), err_msg=path)
        leaf_bytes[path] = want.nbytes
        shard_shape = arr.sharding.shard_shape(arr.shape)
        assert all(s.data.shape == shard_shape for s in arr.addressable_shards), path
    specs = {p: str(a.sharding.spec) for p, a in sharded.items()}
    return {"blocks": blocks, "leaf_bytes": leaf_bytes, "peak": max(windows), "specs": specs}


@pytest.mark.parametrize(
    "mesh_axes,dtype,ways",
    [({"fsdp": 8}, None, 8), ({"clients": 2, "fsdp": 4}, "bfloat16", 4)],
)
def test_sharded_load_equals_plain_load_and_reads_only_blocks(tmp_path, mesh_axes, dtype, ways):
    _save_random(tmp_path, "float32")
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) >= 4, files  # the stacked leaves span several files
    res = run_worker("test_sharding", "_worker_load", str(tmp_path), mesh_axes, dtype)
    assert res["specs"]["layers/mlp/down_proj"] == str(P(None, None, "fsdp"))
    for path, nbytes in res["leaf_bytes"].items():
        # a sharded leaf is read in 1/ways blocks; the small replicated norms whole
        split = "fsdp" in res["specs"][path]
        assert res["blocks"][path] == (nbytes // ways if split else nbytes), path
    largest = max(res["leaf_bytes"].values())
    # Host bytes allocated while one block is read stay far below one full leaf. (Blocks then
    # live on as CPU device buffers: on CPU the devices' memory is the host's.)
    assert res["peak"] < largest / 2, (res["peak"], largest)


def test_shard_files_really_split_layers(tmp_path):
    """Sanity for the fixture: one stacked leaf's layers live in different files."""
    _save_random(tmp_path, "float32")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    files = {weight_map[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(CFG.num_layers)}
    assert len(files) > 1
