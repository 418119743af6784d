"""Run configuration: the full key schema, loading ``file.py:preset`` with overrides, validation.

Every key a run reads exists in ``base_config()`` with a typed default, so a CLI override such as
``--config.federated.rounds=3`` is type-checked by ``ConfigDict`` and a typo is a one-line error
naming the key and its section's valid keys. Config files (``configs/*.py``) only set presets.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import math
import pathlib
import re
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from ml_collections import ConfigDict

from fedlora_jax.adapters.base import TARGET_PRESETS
from fedlora_jax.data.config import DataConfig


class ConfigError(ValueError):
    """A user mistake in the run configuration; the CLI prints it as one line."""


# Keys with a closed set of values. Keys whose values are owned by another module (adapter.kind,
# algorithm.name, data.source, ...) are checked by that module's registry at build time.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16"),
    "model.compute_dtype": ("float32", "bfloat16"),
    "model.remat_policy": ("layer", "dots_saveable"),
    "federated.backend": ("vmap", "chunked", "shard_map", "mesh", "debug"),
    "optim.schedule": ("constant", "linear", "cosine"),
    "optim.optimizer_state": ("fresh", "persistent"),
    "run.on_no_valid_client": ("error", "stop", "continue"),
    "dp.sampling": ("poisson", "fixed"),
    "dp.accountant": ("pld", "rdp"),
}

# The adapter kind each algorithm trains, used when adapter.kind = "auto" (others: lora).
ALGORITHM_KINDS: dict[str, str] = {
    "fedlora_optimizer": "decomposed",
    "fedalt": "mixture",
    "fedgalore": "dense_delta",
}

# Sub-sections whose keys are free: builder keyword arguments and data column names.
FREE_SECTIONS = ("options", "fields")

# (key, lower bound, whether the bound is inclusive)
BOUNDS: tuple[tuple[str, float, bool], ...] = (
    ("adapter.r", 1, True),
    ("adapter.alpha", 0, False),
    ("adapter.dropout", 0, True),
    ("federated.rounds", 1, True),
    ("federated.clients_per_round", 0, True),
    ("federated.client_fraction", 0, True),
    ("federated.local_steps", 1, True),
    ("federated.batch_size", 1, True),
    ("federated.chunk_size", 1, True),
    ("optim.lr", 0, False),
    ("optim.weight_decay", 0, True),
    ("optim.warmup", 0, True),
    ("optim.grad_clip", 0, True),
    ("eval.every", 0, True),
    ("eval.max_new_tokens", 1, True),
    ("eval.batch_size", 1, True),
    ("eval.max_examples_per_client", 0, True),
    ("checkpoint.every", 0, True),
    ("checkpoint.keep", 1, True),
    ("dp.clip", 0, False),
    ("dp.noise_multiplier", 0, True),
    ("dp.target_epsilon", 0, True),
    ("dp.delta", 0, False),
    ("dp.clip_learning_rate", 0, True),
    ("dp.clipped_count_stddev", 0, True),
)


def data_section() -> ConfigDict:
    """The ``data`` keys with DataConfig's own defaults (its ``fields`` mapping a free section)."""
    section = ConfigDict()
    for f in dataclasses.fields(DataConfig):
        if f.name in FREE_SECTIONS:
            section[f.name] = ConfigDict()
        else:
            section[f.name] = f.default
    return section


def base_config() -> ConfigDict:
    """Every key a run reads, with the defaults of the embedded Dolly setting."""
    c = ConfigDict()
    c.model = ConfigDict(
        {
            "spec": "smollm2-135m",  # alias, local HF folder, or hub id (model.hub.resolve_model)
            "dtype": "float32",  # storage dtype of the frozen base weights
            "compute_dtype": "float32",
            "remat": False,
            # what a rematerialised layer keeps (model.remat = True): "layer" = nothing inside
            # the layer, "dots_saveable" = matmul outputs (docs/model.md, measured effect)
            "remat_policy": "layer",
        }
    )
    c.adapter = ConfigDict(
        {
            "kind": "auto",  # auto = the algorithm's own kind (ALGORITHM_KINDS), else lora
            "r": 8,
            "alpha": 16.0,
            "dropout": 0.05,
            "targets": "qv",
            "norm_axis": "row",
            "norm_eps": 1e-6,
            "init": "default",
        }
    )
    c.data = data_section()  # DataConfig's fields and defaults: one set (docs/data.md)
    c.algorithm = ConfigDict({"name": "fedit", "options": ConfigDict()})
    c.federated = ConfigDict(
        {
            "rounds": 3,
            "clients_per_round": 0,  # 0 = every client (see also client_fraction)
            "client_fraction": 0.0,  # > 0: sample max(1, round(fraction * N)) per round
            "local_steps": 2,
            "batch_size": 4,
            "backend": "vmap",
            "chunk_size": 2,  # clients per lax.map step for the chunked backend
            "mesh": "",  # backend mesh: e.g. "clients=2,fsdp=4" (docs/scaling.md)
            "donate": True,  # donate the round state's buffers to the jitted phase (less memory)
            "packing": True,  # several examples per row (data.batches.packed_round_batches)
            # per-client LoRA ranks (algorithms.rank_mask): "" = all at adapter.r, "2,4,8,8",
            # "cycle:2,4,8" or "uniform:2,4,8" (drawn with run.seed)
            "client_ranks": "",
        }
    )
    c.optim = ConfigDict(
        {
            "lr": 3e-4,
            "weight_decay": 0.0,
            "schedule": "constant",
            "warmup": 0,
            "grad_clip": 1.0,
            "optimizer_state": "fresh",
        }
    )
    c.eval = ConfigDict(
        {
            "every": 0,  # 0 = only after the last round
            "max_new_tokens": 32,
            "batch_size": 8,
            "max_examples_per_client": 8,  # 0 = the whole test split
        }
    )
    c.checkpoint = ConfigDict({"every": 1, "keep": 2})  # every 0 = never
    # User-level central DP (DP-FedAvg, docs/privacy.md): noise_multiplier 0 = calibrate σ to
    # target_epsilon over federated.rounds; target_epsilon 0 = no budget; q (Poisson) or m (fixed)
    # from federated.client_fraction / clients_per_round; adaptive_clip: Andrew et al. 2021
    # (clipped_count_stddev 0 = expected clients / 20).
    c.dp = ConfigDict(
        {
            "enabled": False, "clip": 0.1, "noise_multiplier": 0.0, "target_epsilon": 0.0,
            "delta": 1e-5, "sampling": "poisson", "accountant": "pld", "adaptive_clip": False,
            "target_quantile": 0.5, "clip_learning_rate": 0.2, "clipped_count_stddev": 0.0,
        }
    )  # fmt: skip
    # The run dir is out_dir/name; name "" derives "{tag}-{algorithm.name}-seed{seed}".
    # on_no_valid_client: what a round in which every sampled client sent non-finite values
    # (so the model was not updated) does: "error" = checkpoint, write results.md, exit
    # non-zero; "stop" = the same with exit 0; "continue" = record it and train on.
    c.run = ConfigDict(
        {"seed": 0, "out_dir": "runs", "name": "", "tag": "run", "on_no_valid_client": "error"}
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
    path_str, _, preset = spec.partition(":")
    path = pathlib.Path(path_str)
    if not path.is_file():
        raise ConfigError(f"--config: file {path_str!r} not found")
    module_spec = importlib.util.spec_from_file_location(f"_fedlora_cfg_{path.stem}", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"{path_str}: defines no get_config(preset)")
        cfg = module.get_config(preset) if preset else module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # the config file's own mistake: name its file and line
        message = e.msg if isinstance(e, SyntaxError) else e
        raise ConfigError(f"{_where(e, path)}: {type(e).__name__}: {message}") from e
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


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


def validate(cfg: ConfigDict) -> None:
    """Check the closed choices and bounds; raise ConfigError naming the key and allowed values."""
    schema = base_config()
    for section in cfg:
        if section not in schema:
            raise ConfigError(_unknown(section, schema))
        for key in cfg[section]:
            if key not in schema[section]:
                raise ConfigError(_unknown(f"{section}.{key}", schema[section]))
    for key, value in _leaves(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} is not valid; must be a finite number")
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not valid; allowed: {', '.join(allowed)}")
    for key, low, inclusive in BOUNDS:
        value = _get(cfg, key)
        if value < low or (value == low and not inclusive):
            op = ">=" if inclusive else ">"
            raise ConfigError(f"{key}={value!r} is not valid; must be {op} {low}")
    DataConfig.from_mapping(cfg.data)  # the data module's own checks (DataError, one line)
    fed, data = cfg.federated, cfg.data
    if fed.client_fraction > 1:
        raise ConfigError(
            f"federated.client_fraction={fed.client_fraction!r} is not valid; must be in [0, 1]"
        )
    if fed.clients_per_round and fed.client_fraction:
        raise ConfigError(
            "federated.clients_per_round and federated.client_fraction are both set; "
            "set one (the other 0)"
        )
    if data.num_clients and fed.clients_per_round > data.num_clients:
        raise ConfigError(
            f"federated.clients_per_round={fed.clients_per_round} exceeds "
            f"data.num_clients={data.num_clients}"
        )
    for key in ("dp.delta", "dp.target_quantile"):
        if not 0 < _get(cfg, key) < 1:
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not valid; must be in (0, 1)")
    if cfg.adapter.dropout >= 1:
        raise ConfigError(f"adapter.dropout={cfg.adapter.dropout!r} is not valid; must be < 1")
    targets = cfg.adapter.targets
    try:
        re.compile(TARGET_PRESETS.get(targets, targets))
    except re.error as e:
        raise ConfigError(
            f"adapter.targets={targets!r} is not a valid regular expression ({e}); "
            f"use a preset ({', '.join(TARGET_PRESETS)}) or a regex over module paths like "
            "'layers.0.attn.q_proj'"
        ) from None


def adapter_kind(cfg: ConfigDict) -> str:
    """adapter.kind, with "auto" resolved from the algorithm."""
    if cfg.adapter.kind != "auto":
        return cfg.adapter.kind
    return ALGORITHM_KINDS.get(cfg.algorithm.name, "lora")


def run_name(cfg: ConfigDict) -> str:
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


def _get(cfg: ConfigDict, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node
