"""The common row type every source loads into, and the data error type."""

from __future__ import annotations

import dataclasses


class DataError(ValueError):
    """A user-facing data problem; the message is one line naming the file:line or config key."""


@dataclasses.dataclass(frozen=True, slots=True)
class Example:
    """One instruction-tuning row.

    ``source_line`` is the 1-based line (jsonl) or record number of the row in its source, kept so
    line-range splits (Shepherd) survive dropped rows. ``group`` is a natural client id (NI task,
    a user id column), "" when the source has none. ``references`` holds every acceptable answer
    (NI has several); ``response`` is the first one and the training target.
    """

    instruction: str
    context: str
    response: str
    category: str
    source_line: int
    group: str = ""
    references: tuple[str, ...] = ()

    @property
    def all_references(self) -> tuple[str, ...]:
        """The references for evaluation: ``references`` or, when empty, ``(response,)``."""
        return self.references or (self.response,)


@dataclasses.dataclass(frozen=True)
class LoadResult:
    """Validated rows plus what validation found.

    ``drop_counts`` counts dropped rows per reason (only under ``on_bad_row="drop"``, plus
    ``duplicate`` when ``dedupe=True``); ``duplicates`` counts exact duplicate rows found (a row
    equal to an earlier one), whether or not they were dropped. ``first_problem`` is
    ``file:line: problem`` of the first dropped bad row ("" when none), so a load that keeps no
    row can say why.
    """

    examples: list[Example]
    drop_counts: dict[str, int]
    duplicates: int
    source: str
    first_problem: str = ""
