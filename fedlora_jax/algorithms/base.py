"""The algorithm contract (API v2): a federated method is typed options, a placement spec and a
few pure functions over pytrees.

The engine stacks the sampled clients on a leading axis and runs each phase's ``client_update``
for all of them in one jitted call; every function also receives the round's ``RoundInfo``, so
no algorithm keeps a counter the engine already knows. Everything here is pure, so ``aggregate``
can be called and unit-tested on its own.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from fedlora_jax.algorithms.training import ClientTraining
from fedlora_jax.federated.context import RoundInfo
from fedlora_jax.settings import Section, setting

PyTree = Any
Array = jax.Array
Tree = dict[str, Any]

# Where an adapter leaf lives (DESIGN.md, "placement spec"): trained and uploaded and aggregated;
# trained and kept on the client; never trained (bitwise its initial or received value); owned
# by the server (sent down, never trained, never uploaded: e.g. a base delta).
PLACEMENTS = ("shared", "personal", "frozen", "server")


class OptionsError(ValueError):
    """A bad ``algorithm.options`` entry; the CLI prints it as one line."""


@struct.dataclass
class Models:
    """The models a state defines: ``global_`` adapters (None: no global model) and
    ``personal`` adapters with a leading client axis N. ``personal_is_global`` says every
    client's personal model is the global one (``personal`` is then None). ``global_label``
    names the global model wherever it is printed: "global" for a model the protocol produces,
    a description ending in "evaluation only" for a construct it never does (FedSA-LoRA's)."""

    global_: PyTree | None
    personal: PyTree | None
    personal_is_global: bool = struct.field(pytree_node=False, default=False)
    global_label: str = struct.field(pytree_node=False, default="global")


@dataclasses.dataclass(frozen=True, eq=False)
class Phase:
    """One broadcast -> client training -> (optional) aggregation step of a round.

    broadcast(server, client_ids[K], info) -> payload (leading K with ``per_client_broadcast``).
    client_update(base, payload, client_state, batches, key, info) -> (upload, client_state,
        metrics) for ONE client; ``batches`` leaves are [steps, batch, seq]; ``metrics`` a flat
        dict of scalars (at least "loss").
    aggregate(server, uploads[K], weights[K], client_ids[K], info) -> server, or None (nothing
        uploaded). ``weights`` are data sizes, 0 for an excluded client (zero-filled upload).
    placement: leaf key -> one of PLACEMENTS; optimizer labels, uploads and personal state are
        derived from it (``placement_labels``, ``select_placed``).
    payload_held: the payload is the server state exactly as the previous round's last
        broadcast sent it (nothing changed it since), so the clients of the previous round
        already hold it; the engine counts its download only for the other clients.
    upload_origin(server) -> what each client's upload starts from (the leaves it received),
        declared when ``aggregate`` uses the uploads only through their (weighted) mean, so
        central DP of the mean covers the phase (``privacy.privatise``); None: it does not.
    last_round_only: ``client_update`` trains only when ``RoundInfo.is_last`` (a no-op in
        earlier rounds); the protocol's budget counts its steps in the last round only.
    """

    name: str
    steps: int
    broadcast: Callable[[PyTree, Array, RoundInfo], PyTree]
    client_update: Callable[..., tuple]
    aggregate: Callable[[PyTree, PyTree, Array, Array, RoundInfo], PyTree] | None
    placement: Mapping[str, str] = dataclasses.field(default_factory=dict)
    per_client_broadcast: bool = False
    payload_held: bool = False
    upload_origin: Callable[[PyTree], PyTree] | None = None
    last_round_only: bool = False

    def __post_init__(self) -> None:
        check_placement(self.name, self.placement)


@dataclasses.dataclass(frozen=True, eq=False)
class Algorithm:
    """init(key, base, num_clients) -> (server_state, client_states with leading axis N; may be
    empty). models(server_state, client_states, info) -> Models.

    ``cache_key`` (name, options, training) lets compiled phases be reused across rebuilds of the
    same algorithm; None keys them on this object.
    """

    name: str
    init: Callable[[Array, PyTree, int], tuple[PyTree, PyTree]]
    phases: tuple[Phase, ...]
    models: Callable[[PyTree, PyTree, RoundInfo], Models]
    pooled_data: bool = False  # Centralised: the engine trains one "client" on the union
    cache_key: Hashable | None = None


# ----------------------------------------------------------------------------- placement


def check_placement(where: str, placement: Mapping[str, str]) -> None:
    bad = {k: v for k, v in placement.items() if v not in PLACEMENTS}
    if bad:
        raise ValueError(f"{where}: placements {bad} are not allowed; allowed: {PLACEMENTS}")


def keys_placed(placement: Mapping[str, str], *where: str) -> tuple[str, ...]:
    """The leaf keys placed in any of ``where``, in the spec's order."""
    return tuple(k for k, v in placement.items() if v in where)


def placement_labels(placement: Mapping[str, str]) -> Callable[[Tree], Tree]:
    """Optimizer labels (``optax.partition``): shared and personal train, frozen and server get
    a zero update."""
    from fedlora_jax.adapters import label_tree

    rule = {k: v if v in ("shared", "personal") else "frozen" for k, v in placement.items()}
    return lambda params: label_tree(params, rule)


def _is_leaf(node: Any) -> bool:
    return (
        isinstance(node, Mapping)
        and bool(node)
        and not any(isinstance(v, Mapping) for v in node.values())
    )


def select_keys(tree: Tree, keys: tuple[str, ...] | list[str]) -> Tree:
    """The same module tree with each leaf cut down to ``keys`` (e.g. only ``B``)."""
    keep = tuple(keys)
    if _is_leaf(tree):
        return {k: tree[k] for k in keep if k in tree}
    return {name: select_keys(sub, keep) for name, sub in tree.items()}


def select_placed(tree: Tree, placement: Mapping[str, str], *where: str) -> Tree:
    """The leaves of ``tree`` placed in ``where`` (e.g. the upload: ``"shared"``)."""
    return select_keys(tree, keys_placed(placement, *where))


def merge_trees(*trees: Tree) -> Tree:
    """Deep union of module trees whose leaves hold disjoint keys (inverse of select_keys)."""
    out: dict[str, Any] = {}
    for tree in trees:
        for name, sub in tree.items():
            if name in out and isinstance(sub, Mapping) and not _is_leaf(sub):
                out[name] = merge_trees(out[name], sub)
            elif name in out and _is_leaf(sub):
                out[name] = {**out[name], **sub}
            else:
                out[name] = sub
    return out


def replicate(tree: PyTree, n: int) -> PyTree:
    """Stack ``n`` copies on a new leading axis (one row per client)."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), tree)


def require_kind(algorithm: str, training: ClientTraining, allowed: tuple[str, ...]) -> None:
    if training.adapter.kind not in allowed:
        raise ValueError(
            f"adapter.kind={training.adapter.kind!r} is not supported by {algorithm}; "
            f"allowed: {', '.join(allowed)}"
        )


# ----------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """An algorithm without options."""


def describe_options(options_cls: type) -> str:
    """``name: type = default`` for every option (the error messages' list of valid ones)."""
    hints = typing.get_type_hints(options_cls)
    parts = [
        f"{f.name}: {_type_name(hints[f.name])} = {f.default!r}"
        for f in dataclasses.fields(options_cls)
    ]
    return ", ".join(parts) or "(none)"


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _accepts(tp: Any, value: Any) -> tuple[bool, Any]:
    """(ok, value coerced): ints pass as floats; a comma string passes as tuple[str, ...]."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            ok, v = _accepts(arm, value)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is tuple:
        if isinstance(value, str):
            value = tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return True, tuple(value)
        return False, value
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    return isinstance(value, tp), value


def parse_options(name: str, options_cls: type, given: Mapping[str, Any]) -> Any:
    """``options_cls(**given)`` type-checked; an unknown or mistyped option (or one its
    ``__post_init__`` rejects) is one OptionsError line listing the valid options."""
    hints = typing.get_type_hints(options_cls)
    valid = f"valid options of {name}: {describe_options(options_cls)}"
    values = {}
    for key, value in given.items():
        if key not in hints:
            raise OptionsError(f"algorithm.options.{key} is not an option of {name}; {valid}")
        ok, values[key] = _accepts(hints[key], value)
        if not ok:
            raise OptionsError(
                f"algorithm.options.{key}={value!r} is not a {_type_name(hints[key])}; {valid}"
            )
    try:
        return options_cls(**values)
    except OptionsError:
        raise
    except ValueError as e:
        raise OptionsError(f"{e}; {valid}") from None


# ----------------------------------------------------------------------------- registry

Builder = Callable[[ClientTraining, Any], Algorithm]  # builder(training, options) -> Algorithm


@dataclasses.dataclass(frozen=True)
class Registered:
    name: str
    options: type
    builder: Builder

    def __call__(self, training: ClientTraining, **options: Any) -> Algorithm:
        """Parse ``options`` and build; the result's compiled phases are cached on
        (name, options, training)."""
        parsed = parse_options(self.name, self.options, options)
        alg = self.builder(training, parsed)
        return dataclasses.replace(alg, cache_key=(self.name, parsed, training))


_REGISTRY: dict[str, Registered] = {}


def register(name: str, options: type = NoOptions) -> Callable[[Builder], Registered]:
    """Register ``builder(training, options: Options) -> Algorithm`` under ``name``."""

    def deco(fn: Builder) -> Registered:
        _REGISTRY[name] = Registered(name, options, fn)
        return _REGISTRY[name]

    return deco


def get(name: str) -> Registered:
    """The algorithm registered under ``name``: ``get("fedit")(training, **options)``."""
    from fedlora_jax import algorithms as _pkg  # noqa: F401  (imports register the built-ins)

    if name not in _REGISTRY:
        raise ValueError(
            f"algorithm.name={name!r} is not known; allowed: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def reads_run_length(name: str, options: Mapping[str, Any]) -> bool:
    """Whether the algorithm's schedule depends on ``RoundInfo.total_rounds`` (its Options'
    ``reads_run_length``), so a resumed run may not change the number of rounds."""
    registered = get(name)
    parsed = parse_options(name, registered.options, options)
    return bool(getattr(parsed, "reads_run_length", False))


def names() -> list[str]:
    from fedlora_jax import algorithms as _pkg  # noqa: F401

    return sorted(_REGISTRY)


@dataclasses.dataclass(frozen=True)
class AlgorithmSettings(Section):
    """The ``algorithm`` section of a run config: the method and its options (a free section,
    typed by the method's own Options when it is built)."""

    section = "algorithm"
    name: str = setting("fedit", "the method (docs/methods.md)")
    options: Mapping[str, Any] = setting({}, "the method's Options (table below)")
