"""Checkpointer: round trip, typed keys, interrupted-save safety, retention."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax.checkpoint import Checkpointer


def _state(seed: int) -> dict:
    k = jax.random.key(seed)
    return {
        "server": {"A": jax.random.normal(k, (3, 5)), "B": jnp.zeros((5, 3), jnp.bfloat16)},
        "clients": {"B_M": jax.random.uniform(jax.random.fold_in(k, 1), (4, 5))},
        "opt": [jnp.int32(seed), jnp.ones((2,))],
        "key": jax.random.fold_in(k, 7),
        "order": np.arange(4, dtype=np.int32) + seed,
        "round": seed,  # a Python int, like EngineState.round
    }


def _assert_same(a: dict, b: dict) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = (v if hasattr(v, "dtype") else np.asarray(v) for v in (x, y))
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact_and_keeps_types(tmp_path: pathlib.Path) -> None:
    with Checkpointer(tmp_path / "ck", keep=3) as ck:
        ck.save(1, _state(1), {"round": 1, "history": [{"loss": 1.5}]})
        ck.save(2, _state(2), {"round": 2, "history": [{"loss": 1.5}, {"loss": 1.2}]})
        assert ck.complete_steps() == [1, 2]
    with Checkpointer(tmp_path / "ck", keep=3) as ck:
        state, meta = ck.restore(_state(0))
        assert meta == {"round": 2, "history": [{"loss": 1.5}, {"loss": 1.2}]}
        _assert_same(state, _state(2))
        assert isinstance(state["order"], np.ndarray)
        assert type(state["round"]) is int and state["round"] == 2
        # the restored key draws the same numbers as the saved one
        np.testing.assert_array_equal(
            jax.random.normal(state["key"], (3,)), jax.random.normal(_state(2)["key"], (3,))
        )
        older, meta1 = ck.restore(_state(0), step=1)
        _assert_same(older, _state(1))
        assert meta1["round"] == 1


def test_restored_state_does_not_recompile_jitted_functions(tmp_path: pathlib.Path) -> None:
    """Orbax returns device-committed arrays; jit keys its cache on commitment, so a resumed run
    would compile its round function again unless restore matches the fresh state's."""
    f = jax.jit(lambda s: s["server"]["A"].sum() + jax.random.normal(s["key"]))
    like = _state(0)
    f(like)
    with Checkpointer(tmp_path, keep=1) as ck:
        ck.save(1, _state(1), {"round": 1})
        restored, _ = ck.restore(like)
    f(restored)
    assert f._cache_size() == 1


def test_keeps_only_the_newest(tmp_path: pathlib.Path) -> None:
    with Checkpointer(tmp_path, keep=2) as ck:
        for step in range(1, 5):
            ck.save(step, _state(step), {"round": step})
        assert ck.complete_steps() == [3, 4]


@pytest.mark.parametrize("garbage", ["4.orbax-checkpoint-tmp-1234567", "4"])
def test_interrupted_save_leaves_previous_checkpoint_usable(
    tmp_path: pathlib.Path, garbage: str
) -> None:
    """A newer, half-written step (orbax's tmp dir, or a bare step dir without commit markers)
    is ignored: restore picks the latest complete step, and the run can save that round again."""
    with Checkpointer(tmp_path, keep=3) as ck:
        ck.save(2, _state(2), {"round": 2})
        ck.save(3, _state(3), {"round": 3})
    partial = tmp_path / garbage / "state"
    partial.mkdir(parents=True)
    (partial / "manifest.ocdbt").write_bytes(b"\x00truncated")
    with Checkpointer(tmp_path, keep=3) as ck:
        assert ck.latest_step() == 3
        state, meta = ck.restore(_state(0))
        assert meta["round"] == 3
        _assert_same(state, _state(3))
        ck.save(4, _state(4), {"round": 4})  # the resumed run saves round 4 again
        assert ck.complete_steps() == [2, 3, 4]
        _assert_same(ck.restore(_state(0))[0], _state(4))


def test_restore_without_checkpoint_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    ck = Checkpointer(tmp_path, keep=1)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ck.restore(_state(0))
    ck.close()
