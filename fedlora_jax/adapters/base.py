"""Adapter configuration, the kind registry and target selection.

An adapter tree is a plain nested dict keyed by module path, e.g.
``{"layers": {"3": {"attn": {"q_proj": {"A": ..., "B": ...}}}}}``. The model never needs to know
which kind it holds: each adapted linear layer calls ``AdapterConfig.apply`` for the additive
output. New kinds (FedALT mixture, FedGaLore dense delta) register here without touching the
model. A leaf may also hold a server-owned ``base_delta`` [in, out] (placement ``server``: e.g.
FedEx-LoRA's residual), added to the base weight's output by every kind.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax

from fedlora_jax.model.config import module_paths
from fedlora_jax.settings import Section, setting

Array = jax.Array
Leaf = dict[str, Array]  # one module's adapter parameters, e.g. {"A": ..., "B": ...}
BASE_DELTA = "base_delta"  # a server-owned ΔW0 [in, out] inside a leaf, applied by every kind

TARGET_PRESETS: dict[str, str] = {
    "qv": r"layers\.\d+\.attn\.(q_proj|v_proj)",
    "attn": r"layers\.\d+\.attn\.(q_proj|k_proj|v_proj|o_proj)",
    "all-linear": r"layers\.\d+\.(attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
}

NORM_AXES = ("row", "col")
INIT_SCHEMES = ("default", "paper_literal")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Static (hashable) description of an adapter; passed to jitted functions as a static arg."""

    kind: str = "lora"  # registry key: lora | decomposed | mixture | dense_delta
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "qv"  # a TARGET_PRESETS key or a regex (fullmatch) over module paths
    norm_axis: str = "row"  # decomposed: "row" (DESIGN default) or "col"
    norm_eps: float = 1e-6  # decomposed: epsilon inside the direction norm
    init: str = "default"  # decomposed: "default" (B_M = 0) or "paper_literal" (small non-zero B)

    def __post_init__(self) -> None:
        """Reject a bad value at construction, naming the config key and the allowed values."""
        if self.r < 1:
            raise ValueError(f"adapter.r={self.r!r} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapter.dropout={self.dropout!r} must be in [0, 1)")
        if self.norm_axis not in NORM_AXES:
            raise ValueError(
                f"adapter.norm_axis={self.norm_axis!r} is not allowed; "
                f"allowed: {', '.join(NORM_AXES)}"
            )
        if self.init not in INIT_SCHEMES:
            raise ValueError(
                f"adapter.init={self.init!r} is not allowed; allowed: {', '.join(INIT_SCHEMES)}"
            )
        if self.norm_eps <= 0.0:
            raise ValueError(f"adapter.norm_eps={self.norm_eps!r} must be > 0")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def target_regex(self) -> re.Pattern[str]:
        return re.compile(TARGET_PRESETS.get(self.targets, self.targets))

    def apply(self, leaf: Leaf, x: Array, key: Array | None) -> Array:
        """The additive output of one adapted linear (the model's ``AdapterSpec``)."""
        if BASE_DELTA in leaf:
            own = {k: v for k, v in leaf.items() if k != BASE_DELTA}
            return get_kind(self.kind).apply(own, x, self, key) + x @ leaf[BASE_DELTA].astype(
                x.dtype
            )
        return get_kind(self.kind).apply(leaf, x, self, key)


@dataclasses.dataclass(frozen=True)
class AdapterSettings(Section):
    """The ``adapter`` section of a run config; ``resolve`` gives the AdapterConfig trained."""

    section = "adapter"
    kind: str = setting(
        "auto", "auto = the algorithm's own kind (config.ALGORITHM_KINDS), else lora"
    )
    r: int = setting(8, "LoRA rank (the largest one with federated.client_ranks)", low=1)
    alpha: float = setting(16.0, "LoRA alpha; the scale is alpha / r", low=0, inclusive=False)
    dropout: float = setting(0.05, "dropout on the adapter's input while training", low=0)
    targets: str = setting(
        "qv", f"adapted linears: a preset ({', '.join(TARGET_PRESETS)}) or a regex over module "
        "paths like 'layers.0.attn.q_proj'"
    )  # fmt: skip
    norm_axis: str = setting("row", "decomposed: the norm axis of A and B", choices=NORM_AXES)
    norm_eps: float = setting(1e-6, "decomposed: epsilon inside the norm", low=0, inclusive=False)
    init: str = setting(
        "default",
        "decomposed: default = B_M 0; paper_literal = small non-zero B",
        choices=INIT_SCHEMES,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dropout >= 1:
            raise self.fail("dropout", "must be < 1")
        try:
            re.compile(TARGET_PRESETS.get(self.targets, self.targets))
        except re.error as e:
            raise self.fail(
                "targets",
                f"it is not a regular expression ({e}); use a preset "
                f"({', '.join(TARGET_PRESETS)}) or a regex over module paths like "
                "'layers.0.attn.q_proj'",
            ) from None

    def resolve(self, kind: str) -> AdapterConfig:
        """The AdapterConfig trained, with ``kind`` ("auto" already resolved)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return AdapterConfig(**{**values, "kind": kind})


@dataclasses.dataclass(frozen=True)
class AdapterKind:
    """Pure functions that define one adapter kind.

    init(key, in_features, out_features, cfg) -> Leaf
    apply(leaf, x, cfg, dropout_key) -> additive output (..., out_features); dropout_key None = eval
    delta_weight(leaf, cfg) -> ΔW in (in_features, out_features) layout, so merged W = W0 + ΔW
    factors(leaf, cfg) -> {"A": [r,in], "B": [out,r]} with ΔW = scale·(B@A).T; None when the kind
        has no input-independent low-rank form (mixture, dense delta)
    """

    name: str
    init: Callable[[Array, int, int, AdapterConfig], Leaf]
    apply: Callable[[Leaf, Array, AdapterConfig, Array | None], Array]
    delta_weight: Callable[[Leaf, AdapterConfig], Array]
    factors: Callable[[Leaf, AdapterConfig], Leaf] | None = None


_KINDS: dict[str, AdapterKind] = {}


def register_kind(kind: AdapterKind) -> AdapterKind:
    _KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> AdapterKind:
    if name not in _KINDS:
        raise ValueError(
            f"adapter.kind={name!r} is not known; allowed: {', '.join(sorted(_KINDS))}"
        )
    return _KINDS[name]


def select_targets(num_layers: int, cfg: AdapterConfig) -> list[str]:
    """Module paths (``model.config.module_paths``) matched (fullmatch) by the target preset or
    regex."""
    rx = cfg.target_regex()
    chosen = [p for p in module_paths(num_layers) if rx.fullmatch(p)]
    if not chosen:
        raise ValueError(
            f"adapter.targets={cfg.targets!r} matches no module; presets: "
            f"{', '.join(TARGET_PRESETS)}; or a regex over paths like 'layers.0.attn.q_proj'"
        )
    return chosen


def get_path(tree: dict[str, Any], path: str) -> Any:
    """Look up a dotted path in a nested dict; None when absent."""
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def set_path(tree: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
