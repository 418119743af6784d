"""Loading instruction data into validated ``Example`` rows.

Dolly-15k and the 16-task Natural Instructions subset ship inside the package, so the default
runs need no network. Other data comes by path: a jsonl (optionally gzipped), json, csv or
parquet file, a folder of Natural Instructions task files, or a hub dataset id (only when
online: offline it fails at once instead of costing ``datasets``' retries).

Text files are read here as bytes, line by line, so every problem names ``file:line``: a byte
that is not UTF-8 makes its row bad (``bad_encoding``), not the file; a damaged gzip stream
yields the rows before the damage and then one ``bad_gzip_tail`` record; a UTF-8 byte-order mark
is skipped and a UTF-16/32 file is refused by name. CSV cells are all text (no type inference).
"""

from __future__ import annotations

import codecs
import collections
import csv
import gzip
import importlib.resources
import json
import os
import pathlib
import re
import zlib
from collections.abc import Iterator, Mapping
from typing import IO, Any

from fedlora_jax.data.rows import DataError, LoadResult
from fedlora_jax.data.validate import (
    BadRecord,
    RawRecord,
    not_utf8,
    require_rows,
    resolve_fields,
    undecodable,
    validate_records,
)

SOURCES = ("dolly", "natural_instructions", "path")
NI_FIELDS = {
    "instruction": "definition",
    "context": "input",
    "response": "output",
    "category": "category",
    "group": "task",
    "references": "outputs",
}
_RESOURCES = importlib.resources.files("fedlora_jax") / "resources" / "data"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_JSONL = (".jsonl", ".jsonl.gz", ".ndjson")
_FILE_TYPES = _JSONL + (".json", ".csv", ".parquet")
# UTF-32 first: its little-endian mark starts with UTF-16's.
_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32LE"),
    (codecs.BOM_UTF32_BE, "UTF-32BE"),
    (codecs.BOM_UTF16_LE, "UTF-16LE"),
    (codecs.BOM_UTF16_BE, "UTF-16BE"),
)


def resource_path(*parts: str) -> pathlib.Path:
    """Path of a data file shipped in ``fedlora_jax/resources/data``."""
    return pathlib.Path(str(_RESOURCES.joinpath(*parts)))


def _open(path: pathlib.Path) -> IO[bytes]:
    try:
        return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _utf8_start(path: pathlib.Path, first_line: bytes) -> bytes:
    """Line 1 without a UTF-8 byte-order mark; UTF-16/32 (by its mark, or by NUL bytes) and
    gzip data in a file not named .gz are refused by name."""
    for bom, name in _BOMS:
        if first_line.startswith(bom):
            raise DataError(
                f"{path}: encoded as {name} (byte-order mark found); convert it to UTF-8, "
                f"e.g. iconv -f {name} -t UTF-8"
            )
    if first_line.startswith(b"\x1f\x8b"):
        raise DataError(
            f"{path}: gzip-compressed but not named .gz; decompress it (or name a jsonl .jsonl.gz)"
        )
    if b"\x00" in first_line:
        raise DataError(
            f"{path}:1: NUL bytes: UTF-16/32 without a byte-order mark, or not a text file; "
            "convert it to UTF-8"
        )
    return first_line.removeprefix(codecs.BOM_UTF8)


def _lines(path: pathlib.Path) -> Iterator[tuple[int, bytes | BadRecord]]:
    """(line number, raw line) of a text file, gzip (.gz) undone, line 1 checked by _utf8_start.

    A gzip stream damaged after line n ends the lines with ``(n + 1, BadRecord("bad_gzip_tail"))``
    (the torn line and whatever followed are lost; how many rows that was is unknowable); one
    damaged before its first line is a DataError whatever the bad-row policy.
    """
    with _open(path) as f:
        number = 0
        while True:
            try:
                line = f.readline()
            except (EOFError, gzip.BadGzipFile, zlib.error) as e:
                why = "truncated?" if isinstance(e, EOFError) else str(e)
                if number == 0:
                    raise DataError(f"{path}: not a valid gzip file ({why})") from None
                yield (
                    number + 1,
                    BadRecord(
                        "bad_gzip_tail",
                        f"not a valid gzip file ({why}) from this line on",
                        hint=f"keeps the {number} lines before it",
                    ),
                )
                return
            except OSError as e:
                raise DataError(f"{path}:{number + 1}: cannot read ({e.strerror or e})") from None
            if not line:
                return
            number += 1
            yield number, _utf8_start(path, line) if number == 1 else line


def _decode(line: bytes) -> str:
    """UTF-8 text, undecodable bytes kept as lone surrogates for the row checks to name."""
    return line.decode("utf-8", "surrogateescape")


def read_jsonl(path: pathlib.Path) -> Iterator[RawRecord]:
    """(line number, parsed object or BadRecord) for every non-blank line; .gz is transparent."""
    first = True
    for number, line in _lines(path):
        if isinstance(line, BadRecord):
            yield number, line
            continue
        text = _decode(line)
        if not text.strip():
            continue
        if first and text.lstrip().startswith("["):
            raise DataError(
                f"{path}:{number}: starts with '[': one JSON array, not JSON lines (an object "
                "per line); name the file .json to read it as an array"
            )
        first = False
        try:
            yield number, json.loads(text)
        except json.JSONDecodeError as e:
            yield number, _json_problem(e)


def _json_problem(e: json.JSONDecodeError) -> BadRecord:
    """A parse failure as a bad record: an undecodable byte where parsing stopped, or bad JSON."""
    char = e.doc[e.pos : e.pos + 1]
    if undecodable(char):
        return BadRecord("bad_encoding", not_utf8(char, f"column {e.colno}"))
    return BadRecord("invalid_json", f"invalid JSON ({e.msg} at column {e.colno})")


def _read_json_document(path: pathlib.Path) -> Any:
    with _open(path) as f:
        first, nl, rest = f.read().partition(b"\n")
    text = _decode(_utf8_start(path, first) + nl + rest)
    if not text.strip():
        raise DataError(f"{path}: no rows (an empty file?)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        problem = _json_problem(e).message
        if e.msg == "Extra data":
            problem += "; one object per line? name the file .jsonl"
        raise DataError(f"{path}:{e.lineno}: {problem}") from None


def _read_json_records(path: pathlib.Path) -> Iterator[RawRecord]:
    doc = _read_json_document(path)
    if isinstance(doc, Mapping) and "Instances" in doc:
        raise DataError(
            f"{path}: a Natural Instructions task file; use source=natural_instructions"
        )
    if not isinstance(doc, list):
        raise DataError(f"{path}: expected a JSON list of row objects, got {type(doc).__name__}")
    yield from enumerate(doc, start=1)


def _read_csv(path: pathlib.Path) -> Iterator[RawRecord]:
    """Rows of a CSV file with a header line, every cell text ("" when empty), numbered by the
    line each record starts on (a quoted cell may span lines)."""
    reader = csv.reader(_decode(line) for _, line in _lines(path))  # no gzip: no BadRecord
    header: list[str] = []
    start = 1
    try:
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not cells:  # a blank line
                continue
            if not header:
                repeated = sorted({c for c in cells if cells.count(c) > 1})
                if repeated:
                    raise DataError(f"{path}:{line}: repeated column name {repeated[0]!r}")
                header = cells
            elif len(cells) != len(header):
                yield (
                    line,
                    BadRecord(
                        "wrong_field_count", f"{len(cells)} cells, the header has {len(header)}"
                    ),
                )
            else:
                yield line, dict(zip(header, cells, strict=True))
    except csv.Error as e:
        raise DataError(f"{path}:{start}: not valid CSV ({e})") from None


def _read_parquet(path: pathlib.Path) -> Iterator[RawRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a valid parquet file ({e})") from None
    yield from enumerate(table.to_pylist(), start=1)


def _offline() -> bool:
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(v.strip().lower() in ("1", "true", "yes", "on") for v in flags)


def _read_hub(hub_id: str) -> Iterator[RawRecord]:
    import datasets  # heavy import: only for the hub

    yield from enumerate(datasets.load_dataset(hub_id, split="train"), start=1)


def _records(path: str) -> tuple[Iterator[RawRecord], str]:
    """Pick the reader for a path or hub id; returns (records, source label for messages)."""
    p = pathlib.Path(path).expanduser()
    name = p.name.lower()
    if p.is_dir():
        raise DataError(f"data.path={path!r}: a directory; give a file ({', '.join(_FILE_TYPES)})")
    if p.is_file():
        if name.endswith(_JSONL):
            return read_jsonl(p), str(p)
        readers = {".json": _read_json_records, ".csv": _read_csv, ".parquet": _read_parquet}
        for ext, reader in readers.items():
            if name.endswith(ext):
                return reader(p), str(p)
        raise DataError(f"data.path={path!r}: unsupported file type; use {', '.join(_FILE_TYPES)}")
    if _HUB_ID.match(path) and not name.endswith(_FILE_TYPES) and not p.exists():
        if _offline():
            raise DataError(
                f"data.path={path!r}: not a local file, and HF_HUB_OFFLINE/"
                "HF_DATASETS_OFFLINE is set, so the hub is not tried"
            )
        return _read_hub(path), f"hub:{path}"
    raise DataError(f"data.path={path!r}: no such file (nor a hub id 'owner/name')")


def load_instructions(
    path: str,
    *,
    fields: Mapping[str, str] | None = None,
    on_bad_row: str = "error",
    dedupe: bool = False,
    verbose: bool = True,
) -> LoadResult:
    """Any instruction dataset by path or hub id, with ``fields`` mapping logical -> column.

    A load that keeps no row is a DataError saying why (an empty file, or every row bad).
    """
    fields = resolve_fields(fields)  # config mistakes first, before any reading
    records, label = _records(path)
    return require_rows(
        validate_records(
            records,
            source=label,
            fields=fields,
            on_bad_row=on_bad_row,
            dedupe=dedupe,
            verbose=verbose,
        )
    )


def load_dolly(
    path: str = "", *, on_bad_row: str = "error", dedupe: bool = False, verbose: bool = True
) -> LoadResult:
    """Dolly-15k: the shipped copy (Shepherd row order) by default, else a path or hub id."""
    path = path or str(resource_path("dolly", "databricks-dolly-15k.jsonl.gz"))
    return load_instructions(path, on_bad_row=on_bad_row, dedupe=dedupe, verbose=verbose)


def _ni_task_records(path: pathlib.Path) -> Iterator[RawRecord]:
    """Rows of one NI v1/v2 task file (Definition + Instances[input, output list])."""
    doc = _read_json_document(path)
    if not isinstance(doc, Mapping) or not isinstance(doc.get("Instances"), list):
        raise DataError(f"{path}: not a Natural Instructions task file (no 'Instances' list)")
    definition = doc.get("Definition", "")
    if isinstance(definition, list):  # v2 stores it as a one-element list
        definition = "\n".join(d for d in definition if isinstance(d, str))
    categories = doc.get("Categories") or []
    category = re.sub(r"\W+", "_", categories[0].strip().lower()) if categories else path.stem
    for number, inst in enumerate(doc["Instances"], start=1):
        if not isinstance(inst, Mapping):
            yield number, inst
            continue
        outputs = inst.get("output")
        outputs = [outputs] if isinstance(outputs, str) else outputs
        first = outputs[0] if isinstance(outputs, list) and outputs else None
        yield (
            number,
            {
                "definition": definition,
                "input": inst.get("input"),
                "output": first if first is not None else "",
                "outputs": outputs,
                "category": category,
                "task": path.stem,
            },
        )


def load_natural_instructions(
    path: str = "", *, on_bad_row: str = "error", dedupe: bool = False, verbose: bool = True
) -> LoadResult:
    """Natural Instructions: the shipped 16-task subset, a jsonl like it, or a task-file folder.

    Rows map instruction = task definition, context = instance input, response = first output,
    references = all outputs, category = task category, group = task name (the client id).
    """
    path = path or str(resource_path("natural_instructions", "ni_v1_16tasks.jsonl.gz"))
    p = pathlib.Path(path).expanduser()
    files = sorted(p.glob("*.json")) if p.is_dir() else [p] if p.suffix == ".json" else []
    if not files:
        if p.is_dir():
            raise DataError(f"data.path={path!r}: folder has no NI task .json files")
        return load_instructions(
            path, fields=NI_FIELDS, on_bad_row=on_bad_row, dedupe=dedupe, verbose=verbose
        )
    results = [
        validate_records(
            _ni_task_records(f),
            source=str(f),
            fields=NI_FIELDS,
            on_bad_row=on_bad_row,
            dedupe=dedupe,
            verbose=verbose,
        )
        for f in files
    ]
    drops = sum((collections.Counter(r.drop_counts) for r in results), collections.Counter())
    return require_rows(
        LoadResult(
            [ex for r in results for ex in r.examples],
            dict(drops),
            sum(r.duplicates for r in results),
            path,
            next((r.first_problem for r in results if r.first_problem), ""),
        )
    )


def load_source(
    source: str,
    path: str = "",
    *,
    fields: Mapping[str, str] | None = None,
    on_bad_row: str = "error",
    dedupe: bool = False,
    verbose: bool = True,
) -> LoadResult:
    """Dispatch on ``data.source`` (dolly | natural_instructions | path)."""
    kw = {"on_bad_row": on_bad_row, "dedupe": dedupe, "verbose": verbose}
    if source == "dolly":
        return load_dolly(path, **kw)
    if source == "natural_instructions":
        return load_natural_instructions(path, **kw)
    if source == "path":
        if not path:
            raise DataError("data.path: required when data.source='path'")
        return load_instructions(path, fields=fields, **kw)
    raise DataError(f"data.source={source!r}: allowed values are {', '.join(SOURCES)}")
