"""Loading instruction data into validated ``Example`` rows.

Dolly-15k and the 16-task Natural Instructions subset ship inside the package, so the default
runs need no network. Other data comes by path: a jsonl/json file (parsed here, so a bad line is
reported as ``file:line``), a parquet/csv file (through ``datasets``), a folder of Natural
Instructions task files, or a hub dataset id (only when online: offline it fails at once instead
of costing ``datasets``' retries).
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import os
import pathlib
import re
from collections.abc import Iterator, Mapping
from typing import Any

from fedlora_jax.data.rows import DataError, LoadResult
from fedlora_jax.data.validate import InvalidJSON, RawRecord, resolve_fields, validate_records

SOURCES = ("dolly", "natural_instructions", "path")
DOLLY_HUB_ID = "databricks/databricks-dolly-15k"
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


def resource_path(*parts: str) -> pathlib.Path:
    """Path of a data file shipped in ``fedlora_jax/resources/data``."""
    return pathlib.Path(str(_RESOURCES.joinpath(*parts)))


def read_jsonl(path: pathlib.Path) -> Iterator[RawRecord]:
    """(line number, parsed object or InvalidJSON) for every non-blank line; .gz is transparent."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                yield number, InvalidJSON(f"{e.msg} at column {e.colno}")


def _read_json_document(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


def _read_json_records(path: pathlib.Path) -> Iterator[RawRecord]:
    doc = _read_json_document(path)
    if isinstance(doc, Mapping) and "Instances" in doc:
        raise DataError(
            f"{path}: a Natural Instructions task file; use source=natural_instructions"
        )
    if not isinstance(doc, list):
        raise DataError(f"{path}: expected a JSON list of row objects, got {type(doc).__name__}")
    yield from enumerate(doc, start=1)


def _offline() -> bool:
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(v.strip().lower() in ("1", "true", "yes", "on") for v in flags)


def _read_with_datasets(builder: str, path: pathlib.Path | str) -> Iterator[RawRecord]:
    import datasets  # heavy import: only for the sources that need it

    if builder == "hub":
        ds = datasets.load_dataset(str(path), split="train")
    else:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    yield from enumerate(ds, start=1)


def _records(path: str) -> tuple[Iterator[RawRecord], str]:
    """Pick the reader for a path or hub id; returns (records, source label for messages)."""
    p = pathlib.Path(path).expanduser()
    if p.is_file():
        name = p.name.lower()
        if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
            return read_jsonl(p), str(p)
        if name.endswith(".json"):
            return _read_json_records(p), str(p)
        for ext, builder in ((".parquet", "parquet"), (".csv", "csv")):
            if name.endswith(ext):
                return _read_with_datasets(builder, p), str(p)
        raise DataError(
            f"data.path={path!r}: unsupported file type; use .jsonl(.gz), .json, .parquet or .csv"
        )
    if _HUB_ID.match(path) and not p.exists():
        if _offline():
            raise DataError(
                f"data.path={path!r}: not a local file, and HF_HUB_OFFLINE/"
                "HF_DATASETS_OFFLINE is set, so the hub is not tried"
            )
        return _read_with_datasets("hub", path), f"hub:{path}"
    raise DataError(f"data.path={path!r}: no such file (nor a hub id 'owner/name')")


def load_instructions(
    path: str,
    *,
    fields: Mapping[str, str] | None = None,
    on_bad_row: str = "error",
    dedupe: bool = False,
    verbose: bool = True,
) -> LoadResult:
    """Any instruction dataset by path or hub id, with ``fields`` mapping logical -> column."""
    fields = resolve_fields(fields)  # config mistakes first, before any reading
    records, label = _records(path)
    return validate_records(
        records, source=label, fields=fields, on_bad_row=on_bad_row, dedupe=dedupe, verbose=verbose
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
    drops: dict[str, int] = {}
    for r in results:
        for k, v in r.drop_counts.items():
            drops[k] = drops.get(k, 0) + v
    return LoadResult(
        [ex for r in results for ex in r.examples], drops, sum(r.duplicates for r in results), path
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
