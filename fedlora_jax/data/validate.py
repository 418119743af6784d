"""Row validation at load time: one policy for every source.

A bad row either stops the load with a one-line ``DataError`` naming ``file:line`` and the problem
(``on_bad_row="error"``) or is skipped and counted per reason (``"drop"``). Exact duplicates are
not an error: they are always counted and only removed with ``dedupe=True``, because the real
Dolly file has 8 of them and removing them by default would break the Shepherd split.
"""

from __future__ import annotations

import collections
import dataclasses
import re
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

RawRecord = tuple[int, Any]  # (1-based line/record number, dict | BadRecord)
# Lone surrogates: what ``errors="surrogateescape"`` makes of bytes that are not UTF-8
# (U+DC80..U+DCFF), or a JSON escape of half a pair. Neither is text a tokenizer can take.
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclasses.dataclass(frozen=True)
class BadRecord:
    """A record a reader could not turn into an object: the drop reason and the problem.

    ``hint`` completes "data.on_bad_row='drop' ..." in the error: a damaged gzip tail ends the
    file, so dropping it keeps the rows before it rather than skipping one row.
    """

    reason: str
    message: str
    hint: str = "skips it"


def not_utf8(char: str, where: str) -> str:
    """The message for a lone surrogate ``char`` found at ``where``: the byte it stands for."""
    code = ord(char)
    what = f"byte 0x{code - 0xDC00:02x}" if code >= 0xDC80 else f"lone surrogate U+{code:04X}"
    return f"not valid UTF-8 ({what} at {where})"


def undecodable(text: str) -> str | None:
    """Where ``text`` (decoded with surrogateescape) holds a byte that is not UTF-8, else None."""
    m = _SURROGATE.search(text)
    return None if m is None else not_utf8(m.group(), f"character {m.start() + 1} of it")


def resolve_fields(fields: Mapping[str, str] | None) -> dict[str, str]:
    """Merge a user's field mapping over the defaults; unknown logical names are an error."""
    merged = dict(DEFAULT_FIELDS)
    for key, value in (fields or {}).items():
        if key not in FIELDS:
            raise DataError(f"data.fields.{key}: unknown field; allowed: {', '.join(FIELDS)}")
        if not isinstance(value, str):
            raise DataError(f"data.fields.{key}={value!r}: must be a column name (a string)")
        if key in REQUIRED_FIELDS and not value:
            raise DataError(f"data.fields.{key}: required, must name a column")
        merged[key] = value
    return merged


def _row_problem(raw: Any, fields: Mapping[str, str]) -> tuple[str, str] | None:
    """(reason, message) for an invalid row, None for a valid one."""
    if isinstance(raw, BadRecord):
        return raw.reason, raw.message
    if not isinstance(raw, Mapping):
        return "not_an_object", f"expected a JSON object, got {type(raw).__name__}"
    for logical, column in fields.items():
        if not column:
            continue
        if column not in raw:
            bad_names = (
                f"{k!r} is {b}" for k in raw if isinstance(k, str) and (b := undecodable(k))
            )
            if (bad_name := next(bad_names, None)) is not None:
                return "bad_encoding", f"missing field '{column}'; the field name {bad_name}"
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
        for text in value if logical == "references" else [value]:
            if (bad := undecodable(text)) is not None:
                return "bad_encoding", f"field '{column}' is {bad}"
    for logical in REQUIRED_FIELDS:
        if not raw[fields[logical]].strip():
            return f"empty_{logical}", f"empty {logical} in field '{fields[logical]}'"
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
    first_problem = ""
    for line, raw in records:
        problem = _row_problem(raw, fields)
        if problem is not None:
            reason, message = problem
            hint = raw.hint if isinstance(raw, BadRecord) else "skips it"
            if on_bad_row == "error":
                raise DataError(f"{source}:{line}: {message} (data.on_bad_row='drop' {hint})")
            drops[reason] += 1
            first_problem = first_problem or f"{source}:{line}: {message}"
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
    return LoadResult(examples, dict(drops), duplicates, source, first_problem)


def require_rows(result: LoadResult) -> LoadResult:
    """``result`` unchanged when it holds a row; else a one-line error saying why it holds none."""
    if result.examples:
        return result
    if not result.drop_counts:
        raise DataError(f"{result.source}: no rows (an empty file?)")
    counts = ", ".join(f"{k}={v}" for k, v in sorted(result.drop_counts.items()))
    raise DataError(
        f"{result.source}: no valid rows (dropped: {counts}); the first: {result.first_problem}"
    )
