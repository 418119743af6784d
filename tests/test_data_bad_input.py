"""Bad data a user can hand us (issue 11, item 6): each case ends in one line naming the file
(and line) or the config key, and under ``on_bad_row="drop"`` every lost row is counted by reason.

Every file is made here in tmp_path from the shipped Dolly rows; expectations come from the raw
lines (``json.loads``, ``zlib``, the ``csv`` writer), not from the loaders under test.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import importlib.util
import io
import json
import pathlib
import zlib

import pytest

from fedlora_jax.data import DataConfig, DataError, load_dolly, load_instructions
from fedlora_jax.data.pipeline import prepare_federated_data
from fedlora_jax.data.sources import load_source

REPO = pathlib.Path(__file__).resolve().parents[1]
COLUMNS = ("instruction", "context", "response", "category")


@pytest.fixture(scope="module")
def lines(read_shipped_lines) -> list[str]:
    """The first 60 shipped Dolly lines (raw jsonl text)."""
    return read_shipped_lines("dolly/databricks-dolly-15k.jsonl.gz")[:60]


def rows_of(lines: list[str]) -> list[tuple[str, ...]]:
    return [tuple(json.loads(x)[c] for c in COLUMNS) for x in lines]


def rows_in(result) -> list[tuple[str, ...]]:
    return [(e.instruction, e.context, e.response, e.category) for e in result.examples]


def jsonl_bytes(lines: list[str]) -> bytes:
    return "".join(x + "\n" for x in lines).encode()


def one_line_error(path: pathlib.Path, **kw) -> str:
    """The DataError message of loading ``path``; asserts it is one line."""
    with pytest.raises(DataError) as err:
        load_instructions(str(path), verbose=False, **kw)
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def load(path: pathlib.Path, **kw):
    return load_instructions(str(path), verbose=False, **kw)


# --- gzip ---------------------------------------------------------------------------------------


def test_truncated_gzip_keeps_the_rows_before_the_damage(tmp_path, lines):
    # Two gzip members: the first (30 rows) intact, the second cut after its 10-byte header, so
    # exactly the first 30 rows are readable and line 31 is where the damage starts.
    path = tmp_path / "rows.jsonl.gz"
    second = gzip.compress(jsonl_bytes(lines[30:]))
    path.write_bytes(gzip.compress(jsonl_bytes(lines[:30])) + second[:10])
    message = one_line_error(path)
    assert message.startswith(f"{path}:31: not a valid gzip file (truncated?)")
    assert "data.on_bad_row='drop' keeps the 30 lines before it" in message
    dropped = load(path, on_bad_row="drop")
    assert rows_in(dropped) == rows_of(lines[:30])
    assert dropped.drop_counts == {"bad_gzip_tail": 1}


def test_gzip_cut_in_the_middle_keeps_every_complete_line(tmp_path, lines):
    path = tmp_path / "rows.jsonl.gz"
    whole = gzip.compress(jsonl_bytes(lines))
    path.write_bytes(whole[: len(whole) // 2])
    readable = zlib.decompressobj(wbits=31).decompress(path.read_bytes()).count(b"\n")
    assert 0 < readable < len(lines)
    assert one_line_error(path).startswith(f"{path}:{readable + 1}: not a valid gzip file")
    dropped = load(path, on_bad_row="drop")
    assert rows_in(dropped) == rows_of(lines[:readable])
    assert dropped.drop_counts == {"bad_gzip_tail": 1}


@pytest.mark.parametrize("on_bad_row", ["error", "drop"])
def test_not_gzip_at_all_is_one_line_whatever_the_policy(tmp_path, lines, on_bad_row):
    plain = tmp_path / "plain.jsonl.gz"  # plain text named .gz
    plain.write_bytes(jsonl_bytes(lines))
    message = one_line_error(plain, on_bad_row=on_bad_row)
    assert message.startswith(f"{plain}: not a valid gzip file (Not a gzipped file")
    header_only = tmp_path / "cut.jsonl.gz"  # nothing readable: no rows to keep
    header_only.write_bytes(gzip.compress(jsonl_bytes(lines))[:12])
    message = one_line_error(header_only, on_bad_row=on_bad_row)
    assert message == f"{header_only}: not a valid gzip file (truncated?)"


def test_corrupt_gzip_bytes_end_in_one_line(tmp_path, lines):
    path = tmp_path / "rows.jsonl.gz"
    data = bytearray(gzip.compress(jsonl_bytes(lines)))
    data[len(data) // 2 : len(data) // 2 + 8] = bytes(8)
    path.write_bytes(bytes(data))
    assert one_line_error(path).startswith(f"{path}:")
    assert load(path, on_bad_row="drop").drop_counts["bad_gzip_tail"] == 1


# --- encodings ----------------------------------------------------------------------------------


def _with_ff_in(line: str, where: str) -> bytes:
    raw = line.encode()
    if where == "value":
        return raw.replace(b'"response": "', b'"response": "\xff', 1)
    if where == "field name":
        return raw.replace(b'"response"', b'"resp\xffonse"', 1)
    return b"\xff" + raw  # before the object: the JSON itself is broken


@pytest.mark.parametrize("where", ["value", "field name", "json"])
def test_invalid_utf8_byte_is_a_countable_bad_row(tmp_path, lines, where):
    path = tmp_path / "rows.jsonl"
    bad = 7  # 1-based line
    raw = [x.encode() for x in lines]
    raw[bad - 1] = _with_ff_in(lines[bad - 1], where)
    path.write_bytes(b"".join(x + b"\n" for x in raw))
    message = one_line_error(path)
    assert message.startswith(f"{path}:{bad}: ") and "not valid UTF-8 (byte 0xff at " in message
    dropped = load(path, on_bad_row="drop")
    assert dropped.drop_counts == {"bad_encoding": 1}
    assert rows_in(dropped) == rows_of(lines[: bad - 1] + lines[bad:])


def test_json_escaped_lone_surrogate_is_a_bad_row(tmp_path, lines):
    # Valid JSON, but not text: the tokenizer would fail on it with a TypeError mid-run.
    path = tmp_path / "rows.jsonl"
    row = {**json.loads(lines[1]), "response": "half a pair: \ud83d"}
    path.write_text(f"{lines[0]}\n{json.dumps(row)}\n")
    assert '"half a pair: \\ud83d"' in path.read_text()  # written as an escape, valid JSON
    message = one_line_error(path)
    assert message.startswith(
        f"{path}:2: field 'response' is not valid UTF-8 (lone surrogate U+D83D"
    )
    assert "U+D83D at character 14 of it)" in message
    assert load(path, on_bad_row="drop").drop_counts == {"bad_encoding": 1}


@pytest.mark.parametrize(
    ("codec", "name"),
    [("utf-16", "UTF-16LE"), ("utf-16-be", None), ("utf-32", "UTF-32LE")],
)
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".csv", ".json"])
def test_utf16_and_utf32_are_named_not_misread(tmp_path, lines, codec, name, suffix):
    text = "".join(x + "\n" for x in lines)
    data = text.encode(codec)
    if name is None:  # big-endian with an explicit byte-order mark
        data, name = codecs.BOM_UTF16_BE + data, "UTF-16BE"
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    for policy in ("error", "drop"):
        assert one_line_error(path, on_bad_row=policy) == (
            f"{path}: encoded as {name} (byte-order mark found); convert it to UTF-8, "
            f"e.g. iconv -f {name} -t UTF-8"
        )


def test_utf16_without_byte_order_mark_is_named(tmp_path, lines):
    path = tmp_path / "rows.jsonl"
    path.write_bytes("".join(x + "\n" for x in lines).encode("utf-16-le"))
    assert one_line_error(path, on_bad_row="drop").startswith(
        f"{path}:1: NUL bytes: UTF-16/32 without a byte-order mark"
    )


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
def test_gzip_data_not_named_gz_is_named(tmp_path, lines, suffix):
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(gzip.compress(jsonl_bytes(lines)))
    assert one_line_error(path, on_bad_row="drop").startswith(
        f"{path}: gzip-compressed but not named .gz"
    )


def test_utf8_byte_order_mark_is_read(tmp_path, lines):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_bytes(codecs.BOM_UTF8 + jsonl_bytes(lines))
    as_array = tmp_path / "rows.json"
    as_array.write_bytes(codecs.BOM_UTF8 + json.dumps([json.loads(x) for x in lines]).encode())
    for path in (jsonl, as_array):
        assert rows_in(load(path)) == rows_of(lines)


# --- CSV ----------------------------------------------------------------------------------------

IDS = ("007", "1e3", "12", "NaN", "true", "")  # numeric/boolean/null-looking text stays text


def write_csv(path: pathlib.Path, rows: list[dict[str, str]]) -> list[int]:
    """Write ``rows`` with a header; returns the 1-based line each record starts on."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    starts = []
    for row in rows:
        starts.append(out.getvalue().count("\n") + 1)
        writer.writerow(row)
    path.write_text(out.getvalue(), encoding="utf-8")
    return starts


def dolly_csv_rows(lines: list[str]) -> list[dict[str, str]]:
    return [{**json.loads(x), "user": IDS[i % len(IDS)]} for i, x in enumerate(lines)]


def test_csv_export_empty_optional_cell_is_empty_text(tmp_path, lines):
    rows = dolly_csv_rows(lines)
    assert sum(r["context"] == "" for r in rows) >= 10  # Dolly's empty contexts are exercised
    path = tmp_path / "dolly.csv"
    starts = write_csv(path, rows)
    assert starts[-1] > len(rows) + 1  # multi-line cells: record start lines are not row + 1
    for policy in ("error", "drop"):
        res = load(path, on_bad_row=policy)
        assert rows_in(res) == rows_of(lines) and res.drop_counts == {}
        assert [e.source_line for e in res.examples] == starts
    grouped = load_source("path", str(path), fields={"group": "user"}, verbose=False)
    assert [e.group for e in grouped.examples] == [r["user"] for r in rows]


def test_csv_empty_required_cell_and_wrong_cell_count_are_bad_rows(tmp_path, lines):
    rows = dolly_csv_rows(lines)
    rows[3]["instruction"] = ""
    rows[8]["response"] = "  "
    path = tmp_path / "dolly.csv"
    starts = write_csv(path, rows)
    message = one_line_error(path)
    assert message.startswith(f"{path}:{starts[3]}: empty instruction in field 'instruction'")
    dropped = load(path, on_bad_row="drop")
    assert dropped.drop_counts == {"empty_instruction": 1, "empty_response": 1}
    kept = [i for i in range(len(lines)) if i not in (3, 8)]
    assert rows_in(dropped) == rows_of([lines[i] for i in kept])
    assert [e.source_line for e in dropped.examples] == [starts[i] for i in kept]

    short = tmp_path / "short.csv"
    short.write_text("instruction,context,response,category\na,,b,c\nd,e,f\n")
    assert one_line_error(short).startswith(f"{short}:3: 3 cells, the header has 4")
    assert load(short, on_bad_row="drop").drop_counts == {"wrong_field_count": 1}
    repeated = tmp_path / "repeated.csv"
    repeated.write_text("instruction,response,response\na,b,c\n")
    assert one_line_error(repeated) == f"{repeated}:1: repeated column name 'response'"


# --- other mistakes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("empty.jsonl", b""),
        ("blank.jsonl", b"\n  \n\n"),
        ("empty.jsonl.gz", gzip.compress(b"")),
        ("empty.csv", b""),
        ("header_only.csv", b"instruction,context,response,category\n"),
        ("empty.json", b""),
        ("empty_list.json", b"[]"),
    ],
)
def test_a_file_without_rows_is_one_line(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    for policy in ("error", "drop"):
        assert one_line_error(path, on_bad_row=policy) == f"{path}: no rows (an empty file?)"


def test_json_array_named_jsonl_and_jsonl_named_json(tmp_path, lines):
    objects = [json.loads(x) for x in lines[:3]]
    for text in (json.dumps(objects), json.dumps(objects, indent=2)):
        path = tmp_path / "rows.jsonl"
        path.write_text(text)
        for policy in ("error", "drop"):
            assert one_line_error(path, on_bad_row=policy).startswith(
                f"{path}:1: starts with '[': one JSON array, not JSON lines"
            )
    path = tmp_path / "rows.json"
    path.write_text("\n".join(lines[:3]))
    assert one_line_error(path) == (
        f"{path}:2: invalid JSON (Extra data at column 1); one object per line? "
        "name the file .jsonl"
    )


def test_blank_lines_are_skipped_and_a_list_row_is_a_bad_row(tmp_path, lines):
    path = tmp_path / "rows.jsonl"
    path.write_text(f"{lines[0]}\n\n{lines[1]}\n[1, 2]\n{lines[2]}\n")
    message = one_line_error(path)
    assert message.startswith(f"{path}:4: expected a JSON object, got list")
    dropped = load(path, on_bad_row="drop")
    assert rows_in(dropped) == rows_of(lines[:3]) and dropped.drop_counts == {"not_an_object": 1}
    assert [e.source_line for e in dropped.examples] == [1, 3, 5]


def test_unmapped_columns_for_source_path(tmp_path, lines):
    path = tmp_path / "pairs.jsonl"
    pairs = [{"prompt": json.loads(x)["instruction"], "completion": "ok"} for x in lines[:5]]
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    with pytest.raises(DataError) as err:
        load_source("path", str(path), verbose=False)
    assert str(err.value) == (
        f"{path}:1: missing field 'instruction' (map it with data.fields.instruction) "
        "(data.on_bad_row='drop' skips it)"
    )
    with pytest.raises(DataError) as err:  # every row dropped: say why, not just "no rows"
        load_source("path", str(path), on_bad_row="drop", verbose=False)
    assert str(err.value) == (
        f"{path}: no valid rows (dropped: missing_field=5); the first: {path}:1: missing field "
        "'instruction' (map it with data.fields.instruction)"
    )
    mapped = {"instruction": "prompt", "response": "completion", "context": "", "category": ""}
    res = load_source("path", str(path), fields=mapped, verbose=False)
    assert [e.instruction for e in res.examples] == [p["prompt"] for p in pairs]


def test_path_mistakes_are_one_line(tmp_path):
    with pytest.raises(DataError, match=r"^data\.path='.*': a directory; give a file \("):
        load_source("path", str(tmp_path), verbose=False)
    with pytest.raises(DataError, match=r"^data\.path='.*': a directory"):
        load_dolly(str(tmp_path), verbose=False)
    missing = tmp_path / "data" / "rows.jsonl"  # owner/name-shaped but a file name: no hub try
    with pytest.raises(DataError, match=r"^data\.path='.*': no such file"):
        load_source("path", str(missing), verbose=False)
    with pytest.raises(DataError, match=r"no such file"):
        load_source("path", "no-such-owner-4f1c/rows.jsonl", verbose=False)
    parquet = tmp_path / "rows.parquet"
    parquet.write_text("not parquet")
    assert one_line_error(parquet).startswith(f"{parquet}: not a valid parquet file (")


def test_data_path_and_fields_mistakes_name_the_key(tmp_path):
    with pytest.raises(DataError, match=r"^data\.fields: only read with data\.source='path'"):
        DataConfig(source="dolly", fields={"response": "output"})
    with pytest.raises(DataError, match=r"^data\.path=3: must be a file path or hub id"):
        DataConfig(source="path", path=3)
    assert DataConfig(source="path", path=tmp_path / "x.jsonl").path == str(tmp_path / "x.jsonl")
    with pytest.raises(DataError, match=r"^data\.fields\.response=3: must be a column name"):
        load_source("path", str(tmp_path / "x.jsonl"), fields={"response": 3})


# --- every drop is counted, once, by reason -----------------------------------------------------


@pytest.fixture(scope="module")
def tok(stories_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stories_dir)


@pytest.mark.parametrize("max_prompt_len", [0, 110])
def test_federated_data_counts_every_lost_row_once(tmp_path, lines, tok, max_prompt_len):
    good = [x.encode() for x in lines]  # 60 rows
    bad = [
        b'{"instruction": "x", "response": ',  # invalid_json
        b"[1, 2]",  # not_an_object
        _with_ff_in(lines[0], "value"),  # bad_encoding
        json.dumps({**json.loads(lines[1]), "response": " "}).encode(),  # empty_response
        good[2],  # duplicate (dedupe=True)
    ]
    path = tmp_path / "rows.jsonl.gz"
    body = b"".join(x + b"\n" for x in good[:20] + bad + good[20:])
    path.write_bytes(gzip.compress(body) + gzip.compress(b"lost")[:10])  # + bad_gzip_tail
    cfg = {
        "source": "path",
        "path": str(path),
        "partition": "iid",
        "num_clients": 2,
        "min_client_size": 1,
        "test_fraction": 0.4,  # 12 test rows per client of 30
        "test_cap": 0,
        "max_seq_len": 127,  # stories260K: most rows cannot fit
        "max_prompt_len": max_prompt_len,
        "on_bad_row": "drop",
        "dedupe": True,
    }
    fd = prepare_federated_data(cfg, tok, verbose=False)
    drops = dict(fd.drop_counts)
    too_long, too_long_prompt = drops.pop("too_long", 0), drops.pop("too_long_prompt", 0)
    assert drops == {
        "invalid_json": 1,
        "not_an_object": 1,
        "bad_encoding": 1,
        "empty_response": 1,
        "duplicate": 1,
        "bad_gzip_tail": 1,
    }
    assert rows_in(fd) == rows_of(lines)
    n_train = sum(c.num_train for c in fd.clients)
    n_test = sum(len(c.test.rows) for c in fd.clients)
    assert too_long > 0 and n_test < 24  # some test rows are lost to too_long
    assert (too_long_prompt > 0) == (max_prompt_len > 0)
    # Each validated row is in one client's train or test split: kept or counted exactly once.
    assert n_train + n_test + too_long + too_long_prompt == len(lines)


# --- the CLI --------------------------------------------------------------------------------------


def test_train_cli_prints_one_line_for_a_truncated_gzip(tmp_path, lines, capsys):
    path = tmp_path / "rows.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl_bytes(lines[:30])) + gzip.compress(b"x")[:10])
    spec = importlib.util.spec_from_file_location("train_script", REPO / "scripts" / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = [
        "--config",
        str(REPO / "configs" / "dolly.py:smoke"),
        "--config.data.source=path",
        f"--config.data.path={path}",
        f"--config.run.out_dir={tmp_path / 'runs'}",
        "--no_progress",
    ]
    assert script.main(argv) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert errors == [
        f"error: {path}:31: not a valid gzip file (truncated?) from this line on "
        "(data.on_bad_row='drop' keeps the 30 lines before it)  (--debug shows the traceback)"
    ]
