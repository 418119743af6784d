"""Row validation at load time: one policy for every source.

A bad row either stops the load with a one-line ``DataError`` naming ``file:line`` and the problem
(``on_bad_row="error"``) or is skipped and counted per reason (``"drop"``). Exact duplicates are
not an error: they are always counted and only removed with ``dedupe=True``, because the real
Dolly file has 8 of them and removing them by default would break the Shepherd split.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from typing import Any

from fedlora_jax.data.rows import DataError, Example, LoadResult

ON_BAD_ROW = ("error", "drop")
# Logical field -> whether a row must have it. Optional fields mapped to "" are read as "".
FIELDS = ("instruction", "context", "response", "category", "group", "references")
REQUIRED_FIELDS = ("instruction", "response")
DEFAULT_FIELDS: dict[str, str] = {
    "instruction": "instruction",
    "context": "context",
    "response": "response",
    "category": "category",
    "group": "",
    "references": "",
}

RawRecord = tuple[int, Any]  # (1-based line/record number, dict | InvalidJSON)


class InvalidJSON(str):
    """The parser's message for a line that is not valid JSON (a record that failed to parse)."""


def resolve_fields(fields: Mapping[str, str] | None) -> dict[str, str]:
    """Merge a user's field mapping over the defaults; unknown logical names are an error."""
    merged = dict(DEFAULT_FIELDS)
    for key, value in (fields or {}).items():
        if key not in FIELDS:
            raise DataError(f"data.fields.{key}: unknown field; allowed: {', '.join(FIELDS)}")
        if key in REQUIRED_FIELDS and not value:
            raise DataError(f"data.fields.{key}: required, must name a column")
        merged[key] = value or ""
    return merged


def _row_problem(raw: Any, fields: Mapping[str, str]) -> tuple[str, str] | None:
    """(reason, message) for an invalid row, None for a valid one."""
    if isinstance(raw, InvalidJSON):
        return "invalid_json", f"invalid JSON ({raw})"
    if not isinstance(raw, Mapping):
        return "not_an_object", f"expected a JSON object, got {type(raw).__name__}"
    for logical, column in fields.items():
        if not column:
            continue
        if column not in raw:
            hint = "" if logical in REQUIRED_FIELDS else f", or set data.fields.{logical}=''"
            return "missing_field", (
                f"missing field '{column}' (map it with data.fields.{logical}{hint})"
            )
        value = raw[column]
        if logical == "references":
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                return "non_string_field", f"field '{column}' must be a list of strings"
        elif not isinstance(value, str):
            return "non_string_field", (
                f"field '{column}' must be a string, got {type(value).__name__}"
            )
    if not raw[fields["response"]].strip():
        return "empty_response", f"empty response in field '{fields['response']}'"
    return None


def _example(raw: Mapping[str, Any], fields: Mapping[str, str], line: int) -> Example:
    def get(logical: str) -> str:
        return raw[fields[logical]] if fields[logical] else ""

    refs = tuple(r for r in raw[fields["references"]] if r.strip()) if fields["references"] else ()
    return Example(
        instruction=get("instruction"),
        context=get("context"),
        response=get("response"),
        category=get("category"),
        source_line=line,
        group=get("group"),
        references=refs,
    )


def validate_records(
    records: Iterable[RawRecord],
    *,
    source: str,
    fields: Mapping[str, str] | None = None,
    on_bad_row: str = "error",
    dedupe: bool = False,
    verbose: bool = True,
) -> LoadResult:
    """Turn raw records into Examples under the bad-row policy (see the module docstring)."""
    if on_bad_row not in ON_BAD_ROW:
        raise DataError(f"data.on_bad_row={on_bad_row!r}: allowed values are error, drop")
    fields = resolve_fields(fields)
    examples: list[Example] = []
    drops: collections.Counter[str] = collections.Counter()
    seen: set[tuple[str, ...]] = set()
    duplicates = 0
    for line, raw in records:
        problem = _row_problem(raw, fields)
        if problem is not None:
            reason, message = problem
            if on_bad_row == "error":
                raise DataError(f"{source}:{line}: {message} (data.on_bad_row='drop' skips it)")
            drops[reason] += 1
            continue
        ex = _example(raw, fields, line)
        key = (ex.instruction, ex.context, ex.response, ex.category, ex.group)
        if key in seen:
            duplicates += 1
            if dedupe:
                drops["duplicate"] += 1
                continue
        seen.add(key)
        examples.append(ex)
    if verbose and (drops or duplicates):
        counts = ", ".join(f"{k}={v}" for k, v in sorted(drops.items())) or "none"
        print(
            f"[data] {source}: {len(examples)} rows kept; dropped: {counts}; "
            f"exact duplicates found: {duplicates}"
            + ("" if dedupe else " (kept; dedupe=True drops them)")
        )
    return LoadResult(examples, dict(drops), duplicates, source)
