"""Run configuration: ``RunConfig`` (one typed section per consuming module), the ml_collections
tree the CLI edits (generated from the sections' defaults), ``file.py:preset`` loading with
overrides, and validation.

Every key a run reads is a field of a section (``settings.setting``: default, meaning, allowed
values), so a CLI override such as ``--config.federated.rounds=3`` is type-checked by
``ConfigDict`` and a typo is a one-line error naming the key and its section's valid keys.
Config files (``configs/*.py``) only set presets. ``validate`` returns the typed ``RunConfig``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import math
import pathlib
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from ml_collections import ConfigDict

from fedlora_jax.adapters.base import AdapterConfig, AdapterSettings
from fedlora_jax.algorithms.base import AlgorithmSettings
from fedlora_jax.algorithms.training import OptimSettings
from fedlora_jax.checkpoint import CheckpointSettings
from fedlora_jax.data.config import DataConfig
from fedlora_jax.eval.harness import EvalSettings
from fedlora_jax.federated.engine import FederatedSettings
from fedlora_jax.model.config import ModelSettings
from fedlora_jax.privacy.private import PrivacySettings
from fedlora_jax.settings import ConfigError, Section, is_free, setting

__all__ = ["ConfigError", "RunConfig", "base_config", "load_config", "typed", "validate"]

# The adapter kind each algorithm trains, used when adapter.kind = "auto" (others: lora).
ALGORITHM_KINDS: dict[str, str] = {
    "fedlora_optimizer": "decomposed",
    "fedalt": "mixture",
    "fedgalore": "dense_delta",
    "feddpa": "dual",
}

# Sub-sections whose keys are free: builder keyword arguments and data column names.
FREE_SECTIONS = ("options", "fields")


@dataclasses.dataclass(frozen=True)
class RunSettings(Section):
    """The ``run`` section: identity and location of the run, and what a failed round does."""

    section = "run"
    seed: int = setting(0, "initialisation and client-sampling seed")
    out_dir: str = setting("runs", "the directory that holds run directories")
    name: str = setting("", "the run directory's name; '' = {tag}-{algorithm.name}-seed{seed}")
    tag: str = setting("run", "set by presets to <config file>-<preset>")
    on_no_valid_client: str = setting(
        "error",
        "a round in which every sampled client sent non-finite values: error = checkpoint, "
        "write results.md, exit non-zero; stop = the same with exit 0; continue = train on",
        choices=("error", "stop", "continue"),
    )


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A validated run configuration: one typed section per module that consumes it."""

    model: ModelSettings = dataclasses.field(default_factory=ModelSettings)
    adapter: AdapterSettings = dataclasses.field(default_factory=AdapterSettings)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    algorithm: AlgorithmSettings = dataclasses.field(default_factory=AlgorithmSettings)
    federated: FederatedSettings = dataclasses.field(default_factory=FederatedSettings)
    optim: OptimSettings = dataclasses.field(default_factory=OptimSettings)
    eval: EvalSettings = dataclasses.field(default_factory=EvalSettings)
    checkpoint: CheckpointSettings = dataclasses.field(default_factory=CheckpointSettings)
    dp: PrivacySettings = dataclasses.field(default_factory=PrivacySettings)
    run: RunSettings = dataclasses.field(default_factory=RunSettings)

    def __post_init__(self) -> None:
        """The checks that span sections (each section checked its own keys)."""
        fed, data = self.federated, self.data
        if data.num_clients and fed.clients_per_round > data.num_clients:
            raise ConfigError(
                f"federated.clients_per_round={fed.clients_per_round} exceeds "
                f"data.num_clients={data.num_clients}"
            )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> RunConfig:
        """From a (validated or not) ConfigDict or dict; each section checks its own keys."""
        return cls(**{f.name: f.default_factory.from_mapping(cfg[f.name]) for f in _sections()})

    @property
    def adapter_kind(self) -> str:
        """adapter.kind, with "auto" resolved from the algorithm."""
        return _resolve_kind(self.adapter.kind, self.algorithm.name)

    def adapter_config(self) -> AdapterConfig:
        """The AdapterConfig the run trains."""
        return self.adapter.resolve(self.adapter_kind)


def _sections() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(RunConfig)


def _resolve_kind(kind: str, algorithm: str) -> str:
    return ALGORITHM_KINDS.get(algorithm, "lora") if kind == "auto" else kind


def base_config() -> ConfigDict:
    """Every key a run reads, with its one default (the sections' fields), as the CLI's tree."""
    c = ConfigDict()
    for section in _sections():
        c[section.name] = ConfigDict(
            {
                f.name: ConfigDict() if is_free(f) else f.default
                for f in dataclasses.fields(section.default_factory)
            }
        )
    return c


def smoke_preset(cfg: ConfigDict) -> ConfigDict:
    """stories260K, 4 clients, 2 rounds: the end-to-end run of the test suite (seconds)."""
    cfg.model.spec = "stories260k"
    cfg.adapter.update(r=4, alpha=8.0, dropout=0.0)
    cfg.data.update(num_clients=4, max_seq_len=128, test_cap=8)
    cfg.federated.update(rounds=2, local_steps=3, batch_size=2)
    cfg.optim.lr = 5e-3
    cfg.eval.update(every=1, max_new_tokens=8, batch_size=4, max_examples_per_client=4)
    cfg.checkpoint.update(every=1, keep=3)
    return cfg


def paper_scale_preset(cfg: ConfigDict, model: str, num_clients: int) -> ConfigDict:
    """The papers' GPU/TPU setting: a 7B hub model in bf16, r=8 alpha=16 on q,v, AdamW 3e-4."""
    cfg.model.update(spec=model, dtype="bfloat16", compute_dtype="bfloat16", remat=True)
    cfg.adapter.update(r=8, alpha=16.0, dropout=0.05, targets="qv")
    cfg.data.update(num_clients=num_clients, max_seq_len=512, test_cap=200)
    cfg.federated.update(rounds=20, local_steps=10, batch_size=16, backend="chunked", chunk_size=1)
    cfg.optim.update(lr=3e-4, weight_decay=0.01, schedule="linear", warmup=0)
    cfg.eval.update(every=5, max_new_tokens=128, batch_size=32, max_examples_per_client=100)
    cfg.checkpoint.update(every=5, keep=2)
    return cfg


def pick_preset(file: str, presets: Mapping[str, Any], preset: str) -> ConfigDict:
    """Build ``presets[preset](base_config())`` with run.tag "<file stem>-<preset>"."""
    if preset not in presets:
        name, allowed = pathlib.Path(file).name, ", ".join(presets)
        raise ConfigError(f"{name}: unknown preset {preset!r}; allowed: {allowed}")
    cfg = presets[preset](base_config())
    cfg.run.tag = f"{pathlib.Path(file).stem}-{preset}"
    return cfg


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
    """``configs/dolly.py[:preset]`` plus ``a.b=value`` overrides, validated."""
    cfg = load_preset(spec, "get_config", "--config")
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def load_preset(spec: str, getter: str, flag: str) -> Any:
    """``path.py[:preset]`` -> the file's ``getter(preset)`` (``getter()`` without a preset); a
    missing file, a missing ``getter`` or the file's own mistake (named by file and line) is
    one ConfigError line. ``flag`` names the option the spec came from."""
    path_str, _, preset = spec.partition(":")
    path = pathlib.Path(path_str)
    if not path.is_file():
        raise ConfigError(f"{flag}: file {path_str!r} not found")
    module_spec = importlib.util.spec_from_file_location(f"_fedlora_{getter}_{path.stem}", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        if not hasattr(module, getter):
            raise ConfigError(f"{path_str}: defines no {getter}(preset)")
        return getattr(module, getter)(preset) if preset else getattr(module, getter)()
    except ConfigError:
        raise
    except Exception as e:  # the file's own mistake: name its file and line
        message = e.msg if isinstance(e, SyntaxError) else e
        raise ConfigError(f"{_where(e, path)}: {type(e).__name__}: {message}") from e


def _where(e: BaseException, path: pathlib.Path) -> str:
    """``file:line`` of the deepest frame of ``e`` in the config file ``path``."""
    if isinstance(e, SyntaxError) and e.lineno:
        return f"{path}:{e.lineno}"
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == str(path)]
    return f"{path}:{lines[-1]}" if lines else str(path)


def apply_overrides(cfg: ConfigDict, overrides: Sequence[str]) -> None:
    """Apply ``a.b=value`` strings in place; the value is parsed to the key's existing type."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. federated.rounds=3")
        set_key(cfg, key.strip(), raw)


def set_key(cfg: ConfigDict, key: str, raw: Any) -> None:
    """Set dotted ``key`` from a raw (string) value, coerced to the type of its default."""
    *parents, leaf = key.split(".")
    node = cfg
    for i, part in enumerate(parents):
        node = _child(node, part, ".".join(parents[: i + 1]))
    if leaf not in node:
        if parents and parents[-1] in FREE_SECTIONS:  # any builder kwarg / column name
            node[leaf] = _literal(raw) if isinstance(raw, str) else raw
            return
        raise ConfigError(_unknown(key, node))
    old = node[leaf]
    if isinstance(old, ConfigDict):
        raise ConfigError(f"config key {key!r} is a section; set one of its keys: {_keys(old)}")
    node[leaf] = _coerce(key, raw, old)


def _child(node: ConfigDict, part: str, key: str) -> ConfigDict:
    if part not in node or not isinstance(node[part], ConfigDict):
        raise ConfigError(_unknown(key, node))
    return node[part]


def _unknown(key: str, node: ConfigDict) -> str:
    return f"unknown config key {key!r}; valid keys here: {_keys(node)}"


def _keys(node: ConfigDict) -> str:
    return ", ".join(sorted(node.keys()))


def _literal(raw: str) -> Any:
    text = {"true": "True", "false": "False"}.get(raw.strip().lower(), raw)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return raw


def _coerce(key: str, raw: Any, old: Any) -> Any:
    """Parse ``raw`` to the type of ``old`` (bool, int, float, str), else a one-line error."""
    if not isinstance(raw, str):
        value = raw
    elif isinstance(old, str):
        return raw
    else:
        value = _literal(raw)
    if isinstance(old, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(old, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(old, float):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif isinstance(old, str):
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"config key {key!r} expects {type(old).__name__}, got {raw!r}")


def from_dict(d: Mapping[str, Any]) -> ConfigDict:
    """Rebuild a config from its saved JSON form (a run dir's config.json), on top of the schema
    so that configs saved by older versions still get every key."""
    cfg = base_config()
    for section, values in d.items():
        if section not in cfg:
            raise ConfigError(_unknown(section, cfg))
        for key, value in values.items():
            if key in FREE_SECTIONS:
                cfg[section][key] = ConfigDict(dict(value))
            else:
                set_key(cfg, f"{section}.{key}", value)
    validate(cfg)
    return cfg


def to_dict(cfg: ConfigDict) -> dict[str, Any]:
    """Plain JSON-serialisable dict of the resolved config."""
    return json.loads(cfg.to_json())


# ---------------------------------------------------------------------------------------------
# Validation


def validate(cfg: ConfigDict) -> RunConfig:
    """The typed config, or a ConfigError (DataError for the data section) naming the key and
    the allowed values. Unknown keys are refused here, listing the section's valid keys."""
    schema = base_config()
    for section in cfg:
        if section not in schema:
            raise ConfigError(_unknown(section, schema))
        for key in cfg[section]:
            if key not in schema[section]:
                raise ConfigError(_unknown(f"{section}.{key}", schema[section]))
    for key, value in _leaves(cfg):  # free sections included
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} is not valid; must be a finite number")
    return RunConfig.from_config(cfg)


def typed(cfg: ConfigDict | RunConfig) -> RunConfig:
    """The typed config (a ConfigDict is validated first)."""
    return cfg if isinstance(cfg, RunConfig) else validate(cfg)


def adapter_kind(cfg: ConfigDict) -> str:
    """adapter.kind, with "auto" resolved from the algorithm."""
    return _resolve_kind(cfg.adapter.kind, cfg.algorithm.name)


def run_name(cfg: ConfigDict | RunConfig) -> str:
    """The run directory's name: run.name, or one derived from tag, algorithm and seed."""
    return cfg.run.name or f"{cfg.run.tag}-{cfg.algorithm.name}-seed{cfg.run.seed}"


def _leaves(node: ConfigDict, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every non-section entry, free sections included."""
    out: list[tuple[str, Any]] = []
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, ConfigDict):
            out += _leaves(value, name + ".")
        else:
            out.append((name, value))
    return out
