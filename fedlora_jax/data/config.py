"""The data section of a run config, validated with one-line errors naming key and values."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from fedlora_jax.data.partition import ALIASES, PARTITIONS
from fedlora_jax.data.rows import DataError
from fedlora_jax.data.sources import SOURCES
from fedlora_jax.data.templates import TEMPLATES
from fedlora_jax.data.validate import ON_BAD_ROW


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Every ``data.*`` key (see docs/data.md). ``path=""`` = the copy shipped in the package;
    ``max_prompt_len=0`` = ``max_seq_len``; ``num_clients=0`` with by_task/by_column = one
    client per group. ``include`` (comma-separated or a sequence; "" = all) keeps only the rows
    whose group or category is listed, before partitioning; stored as a tuple of names.
    ``val_fraction`` carves a validation split out of each client's training rows (0 = none),
    for choosing hyperparameters without looking at the test split (docs/protocol.md)."""

    source: str = "dolly"
    path: str = ""
    fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
    include: str | Sequence[str] = ""
    partition: str = "dirichlet"
    alpha: float = 0.5
    num_clients: int = 4
    categories_per_client: int = 2
    min_client_size: int = 10
    test_fraction: float = 0.1
    test_cap: int = 50
    val_fraction: float = 0.0
    max_seq_len: int = 256
    max_prompt_len: int = 0
    min_response_tokens: int = 16
    min_instruction_tokens: int = 16
    template: str = "alpaca"
    on_bad_row: str = "error"
    dedupe: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        choices = {
            "source": SOURCES,
            "template": TEMPLATES,
            "on_bad_row": ON_BAD_ROW,
            "partition": PARTITIONS + tuple(ALIASES),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise DataError(
                    f"data.{key}={getattr(self, key)!r}: allowed values are {', '.join(allowed)}"
                )
        object.__setattr__(self, "partition", ALIASES.get(self.partition, self.partition))
        object.__setattr__(self, "include", _names(self.include))
        minimum = {
            "num_clients": 0,
            "categories_per_client": 1,
            "min_client_size": 0,
            "test_cap": 0,
            "max_seq_len": 8,
            "max_prompt_len": 0,
            "min_response_tokens": 1,
            "min_instruction_tokens": 0,
        }
        for key, low in minimum.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise DataError(f"data.{key}={value!r}: must be an integer >= {low}")
        if not (isinstance(self.alpha, int | float) and self.alpha > 0):
            raise DataError(f"data.alpha={self.alpha!r}: must be a number > 0")
        if not (isinstance(self.test_fraction, int | float) and 0 <= self.test_fraction < 1):
            raise DataError(f"data.test_fraction={self.test_fraction!r}: must be in [0, 1)")
        if not (isinstance(self.val_fraction, int | float) and 0 <= self.val_fraction < 1):
            raise DataError(f"data.val_fraction={self.val_fraction!r}: must be in [0, 1)")
        if self.max_prompt_len > self.max_seq_len:
            raise DataError(
                f"data.max_prompt_len={self.max_prompt_len}: must be <= "
                f"data.max_seq_len={self.max_seq_len}"
            )
        if self.num_clients == 0 and self.partition not in ("by_task", "by_column", "shepherd"):
            raise DataError("data.num_clients=0: only by_task/by_column/shepherd choose it")
        if not isinstance(self.path, str | os.PathLike):
            raise DataError(f"data.path={self.path!r}: must be a file path or hub id (a string)")
        object.__setattr__(self, "path", os.fspath(self.path))
        if not isinstance(self.fields, Mapping):
            raise DataError(f"data.fields={self.fields!r}: must map field names to columns")
        if self.fields and self.source != "path":
            raise DataError(
                f"data.fields: only read with data.source='path' ({self.source} maps its own)"
            )
        if self.partition == "by_column" and not dict(self.fields).get("group"):
            raise DataError("data.partition='by_column': set data.fields.group to the id column")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | Any) -> DataConfig:
        """From a dict or ml_collections ConfigDict; missing keys take the defaults."""
        raw = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise DataError(f"data.{unknown[0]}: unknown key; allowed: {', '.join(sorted(known))}")
        return cls(**raw)


def _names(include: str | Sequence[str]) -> tuple[str, ...]:
    """``"a, b"`` or ``["a", "b"]`` -> ``("a", "b")``: stripped, empty items and repeats dropped."""
    items = include.split(",") if isinstance(include, str) else include
    if not isinstance(items, Sequence) or not all(isinstance(x, str) for x in items):
        raise DataError(f"data.include={include!r}: must be a comma-separated string of names")
    return tuple(dict.fromkeys(x.strip() for x in items if x.strip()))
