"""Typed run-config sections: what each ``--config.<section>`` holds.

Each section is a frozen dataclass declared beside the module that consumes it (``EvalSettings``
in ``eval/harness.py``, ``OptimSettings`` in ``algorithms/training.py``, ...). A field's default,
meaning, allowed values and bound are declared once, with ``setting``; construction checks them
and a bad value is one ``ConfigError`` line naming the key. ``config.RunConfig`` holds one of
each section, and the ml_collections tree the CLI edits is generated from these defaults, so a
run has one set of defaults.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Self


class ConfigError(ValueError):
    """A user mistake in the run configuration; the CLI prints it as one line."""


def setting(
    default: Any,
    meaning: str,
    *,
    choices: tuple[Any, ...] = (),
    low: float | None = None,
    inclusive: bool = True,
) -> Any:
    """A section field: its default, what it means (docs/config.md), its allowed values or lower
    bound (checked at construction). A mapping default is a free sub-section (builder options)."""
    metadata = {"meaning": meaning, "choices": choices, "low": low, "inclusive": inclusive}
    if isinstance(default, Mapping):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def is_free(field: dataclasses.Field) -> bool:
    """A free sub-section: any keys (an algorithm's options, a data file's column names)."""
    return field.default_factory is not dataclasses.MISSING


def allowed_text(field: dataclasses.Field) -> str:
    """The allowed values or the bound, as the error lines and docs/config.md print them."""
    meta = field.metadata
    if meta.get("choices"):
        return ", ".join(map(str, meta["choices"]))
    if meta.get("low") is not None:
        return f"{'>=' if meta['inclusive'] else '>'} {meta['low']}"
    return ""


class Section:
    """Base of the typed sections: ``section`` is the config section's name."""

    section: ClassVar[str]

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            self._check(field, getattr(self, field.name))

    def _check(self, field: dataclasses.Field, value: Any) -> None:
        key, meta = f"{self.section}.{field.name}", field.metadata
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} is not valid; must be a finite number")
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"{key}={value!r} is not valid; allowed: {allowed_text(field)}")
        low = meta.get("low")
        if low is not None and (value < low or (value == low and not meta["inclusive"])):
            raise ConfigError(f"{key}={value!r} is not valid; must be {allowed_text(field)}")

    def fail(self, key: str, why: str) -> ConfigError:
        """The one-line error for this section's ``key``."""
        return ConfigError(f"{self.section}.{key}={getattr(self, key)!r} is not valid; {why}")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> Self:
        """From the section's dict (ConfigDict or JSON); missing keys take the defaults."""
        raw = raw.to_dict() if hasattr(raw, "to_dict") else dict(raw)
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        for key in raw:
            if key not in names:
                valid = ", ".join(sorted(names))
                raise ConfigError(
                    f"unknown config key '{cls.section}.{key}'; valid keys here: {valid}"
                )
        return cls(**raw)
