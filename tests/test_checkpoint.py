"""Checkpointer: round trip, typed keys, interrupted-save safety, retention."""

from __future__ import annotations

import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedlora_jax.algorithms import fedalt, fedgalore
from fedlora_jax.algorithms import fedlora_optimizer as flo
from fedlora_jax.checkpoint import Checkpointer, CheckpointError
from fedlora_jax.federated.engine import EngineState


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


# ------------------------------------------------- checkpoints from before the typed states
#
# Commit 1164ab2 made FedALT's, FedLoRA-Optimizer's and FedGaLore's states flax.struct classes.
# Before it they were dicts (``git show 1164ab2^:fedlora_jax/algorithms/<file>``): the dicts
# below are written by hand in that layout and must restore into today's typed states.


def _arr(seed: int, *shape: int) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape)


def _engine(server, clients, round_: int = 3) -> EngineState:
    return EngineState(server, clients, jnp.arange(2, dtype=jnp.uint32) + round_, round_)


def _zeros(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def _restore_old(tmp_path, old: EngineState, like: EngineState, caplog) -> EngineState:
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(3, old, {"round": 3})
    level = caplog.at_level(logging.WARNING, logger="fedlora_jax.checkpoint")
    with level, Checkpointer(tmp_path / "ck") as ck:
        state, meta = ck.restore(like)
    assert meta == {"round": 3} and state.round == 3
    assert [r.getMessage() for r in caplog.records] == [
        f"checkpoint {tmp_path.resolve() / 'ck' / '3'} holds the algorithm's states as dicts "
        "(saved before commit 1164ab2 typed them); converted to the typed states"
    ]
    np.testing.assert_array_equal(state.rng, old.rng)
    return state


def test_fedlora_optimizer_dict_state_restores_renamed(tmp_path, caplog) -> None:
    """Old: server {"adapters"}, clients {"opt_state" (global phase), "B_M", "has_bm",
    "local_opt_state" (personal phase)}; typed: global_opt_state / personal_opt_state."""
    adapters = {"q": {c: _arr(i, 2, 3) for i, c in enumerate(("A_M", "A_D", "B_M", "B_D"))}}
    rows = {"q": {"B_M": _arr(7, 4, 2, 3)}}
    global_opt = optax.adam(1e-3).init(rows)
    global_opt = jax.tree.map(lambda x: x + 1, global_opt)  # distinct from a fresh state
    personal_opt = jax.tree.map(lambda x: x + 2, global_opt)
    has_bm = jnp.array([True, False, True, False])
    clients = {"opt_state": global_opt, "B_M": rows, "has_bm": has_bm,
               "local_opt_state": personal_opt}  # fmt: skip
    old = _engine({"adapters": adapters}, clients)
    like = _engine(
        flo.ServerState(_zeros(adapters)),
        flo.ClientState(_zeros(rows), jnp.zeros(4, bool), _zeros(global_opt), _zeros(global_opt)),
        0,
    )
    state = _restore_old(tmp_path, old, like, caplog)
    assert isinstance(state.server_state, flo.ServerState)
    _assert_same(state.server_state.adapters, adapters)
    assert isinstance(state.client_states, flo.ClientState)
    _assert_same(state.client_states.B_M, rows)
    _assert_same(state.client_states.has_bm, has_bm)
    _assert_same(state.client_states.global_opt_state, global_opt)
    _assert_same(state.client_states.personal_opt_state, personal_opt)


def test_fedalt_and_fedgalore_dict_states_restore(tmp_path, caplog) -> None:
    """FedALT without a persistent optimizer: server {"individual", "uploaded"}, clients
    {"individual"} (no "opt_state"); FedGaLore with sync=none: server {"adapters"} only,
    clients {}."""
    individual = {"q": {"A1": _arr(1, 4, 2, 3), "B1": _arr(2, 4, 3, 2)}}
    own = {"q": {**individual["q"], "G": _arr(3, 4, 3, 2)}}
    uploaded = jnp.array([True, True, False, True])
    old = _engine({"individual": individual, "uploaded": uploaded}, {"individual": own})
    like = _engine(
        fedalt.ServerState(_zeros(individual), jnp.zeros(4, bool)),
        fedalt.ClientState(_zeros(own), {}),
        0,
    )
    state = _restore_old(tmp_path / "fedalt", old, like, caplog)
    _assert_same(state.server_state.individual, individual)
    _assert_same(state.server_state.uploaded, uploaded)
    _assert_same(state.client_states.individual, own)
    assert state.client_states.opt_state == {}

    caplog.clear()
    dw = {"q": {"dW": _arr(4, 3, 3)}}
    old = _engine({"adapters": dw}, {})
    like = _engine(fedgalore.ServerState(_zeros(dw), {}, {}, {}, {}), {}, 0)
    state = _restore_old(tmp_path / "fedgalore", old, like, caplog)
    assert isinstance(state.server_state, fedgalore.ServerState)
    _assert_same(state.server_state.adapters, dw)
    assert state.server_state.nu == {} and state.client_states == {}


def test_dict_state_of_another_shape_is_one_line(tmp_path) -> None:
    """A dict-layout checkpoint that does not fit this config's states either is refused as
    any checkpoint that does not fit: one line naming it (the typed read's failure)."""
    dw = {"q": {"dW": _arr(4, 3, 3)}}
    with Checkpointer(tmp_path) as ck:
        ck.save(1, _engine({"adapters": dw}, {}), {"round": 1})
    like = _engine(fedgalore.ServerState({"q": {"dW": jnp.zeros((5, 5))}}, {}, {}, {}, {}), {}, 0)
    with Checkpointer(tmp_path) as ck, pytest.raises(CheckpointError) as e:
        ck.restore(like)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("no checkpoint could be restored")
    assert f"{tmp_path.resolve() / '1'} (" in msg
