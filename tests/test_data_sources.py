"""Loading and validation: shipped sources, NI formats, every bad-row case, field mapping."""

from __future__ import annotations

import collections
import gzip
import hashlib
import json
import pathlib

import pytest

from fedlora_jax.data import DataError, load_dolly, load_instructions, load_natural_instructions
from fedlora_jax.data.sources import resource_path

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"

DOLLY_SHA256 = "8d45df5f85d0dd6ce5d481475b3546a1b7d2def22e98e8837a7edbc9af85dfbb"
NI16_SHA256 = "395791540d8b4a28f35200589baa3084828cdc3d7e63def46194c70a8b308745"


@pytest.fixture(scope="module")
def dolly():
    return load_dolly(verbose=False)


@pytest.mark.parametrize(
    ("parts", "sha"),
    [
        (("dolly", "databricks-dolly-15k.jsonl.gz"), DOLLY_SHA256),
        (("natural_instructions", "ni_v1_16tasks.jsonl.gz"), NI16_SHA256),
    ],
)
def test_shipped_files_are_the_published_bytes(parts, sha):
    with gzip.open(resource_path(*parts), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == sha
    assert (resource_path(parts[0]) / "README.md").read_text().count("License") >= 1


def test_dolly_rows_categories_and_duplicates(dolly):
    assert len(dolly.examples) == 15011
    assert dolly.drop_counts == {}
    assert dolly.duplicates == 8  # reported, kept by default
    # Category counts from the official dataset card.
    assert collections.Counter(e.category for e in dolly.examples) == {
        "open_qa": 3742,
        "general_qa": 2191,
        "classification": 2136,
        "closed_qa": 1773,
        "brainstorming": 1766,
        "information_extraction": 1506,
        "summarization": 1188,
        "creative_writing": 709,
    }
    assert [e.source_line for e in dolly.examples[:3]] == [1, 2, 3]
    assert dolly.examples[0].all_references == (dolly.examples[0].response,)


def test_dolly_dedupe_drops_exactly_the_duplicates(dolly):
    deduped = load_dolly(dedupe=True, verbose=False)
    assert len(deduped.examples) == 15011 - 8
    assert deduped.drop_counts == {"duplicate": 8}
    keys = {(e.instruction, e.context, e.response, e.category) for e in dolly.examples}
    assert len(keys) == 15011 - 8


def test_ni_shipped_subset(read_shipped_lines):
    ni = load_natural_instructions(verbose=False)
    assert len(ni.examples) == 4644
    assert len({e.group for e in ni.examples}) == 16
    assert len({e.category for e in ni.examples}) == 6
    raw = [json.loads(x) for x in read_shipped_lines("natural_instructions/ni_v1_16tasks.jsonl.gz")]
    for e, r in zip(ni.examples[::500], raw[::500], strict=True):
        assert (e.instruction, e.context, e.response, e.group) == (
            r["definition"],
            r["input"],
            r["output"],
            r["task"],
        )
        assert e.references == tuple(r["outputs"])


def test_ni_48_task_file_by_path(read_shipped_lines):
    """A user's NI file by path: two rows of each of the 48 v1 tasks (tests/fixtures/README.md);
    a superset of the shipped 16 tasks."""
    path = FIXTURES / "ni_v1_48tasks_2each.jsonl"
    ni = load_natural_instructions(str(path), verbose=False)
    raw = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(ni.examples) == len(raw) == 96
    assert len({e.group for e in ni.examples}) == 48
    for e, r in zip(ni.examples, raw, strict=True):
        assert (e.instruction, e.context, e.response, e.group, e.category) == (
            r["definition"],
            r["input"],
            r["output"],
            r["task"],
            r["category"],
        )
    shipped = {
        json.loads(x)["task"]
        for x in read_shipped_lines("natural_instructions/ni_v1_16tasks.jsonl.gz")
    }
    assert len(shipped) == 16 and shipped < {e.group for e in ni.examples}


def test_ni_task_folder_v1_and_v2(tmp_path):
    (tmp_path / "task900_v2.json").write_text(
        json.dumps(
            {
                "Definition": ["Answer the question."],
                "Categories": ["Question Answering"],
                "Instances": [
                    {"id": "a", "input": "2+2?", "output": ["4", "four"]},
                    {"id": "b", "input": "3+3?", "output": ["6"]},
                ],
            }
        )
    )
    (tmp_path / "subtask001_v1.json").write_text(
        json.dumps(
            {
                "Title": "t",
                "Definition": "Copy the input.",
                "Instances": [{"input": "x", "output": ["x"]}],
            }
        )
    )
    ni = load_natural_instructions(str(tmp_path), verbose=False)
    by_task = collections.defaultdict(list)
    for e in ni.examples:
        by_task[e.group].append(e)
    v2 = by_task["task900_v2"]
    assert [(e.instruction, e.context, e.response, e.category, e.references) for e in v2] == [
        ("Answer the question.", "2+2?", "4", "question_answering", ("4", "four")),
        ("Answer the question.", "3+3?", "6", "question_answering", ("6",)),
    ]
    assert by_task["subtask001_v1"][0].category == "subtask001_v1"  # v1 has no Categories


GOOD = {"instruction": "Say hi.", "context": "", "response": "Hi.", "category": "open_qa"}
BAD_LINES = [
    ("invalid_json", '{"instruction": "x", "response": ', "invalid JSON"),
    (
        "missing_field",
        json.dumps({k: v for k, v in GOOD.items() if k != "response"}),
        "missing field 'response'",
    ),
    ("non_string_field", json.dumps({**GOOD, "context": None}), "field 'context' must be a string"),
    ("empty_response", json.dumps({**GOOD, "response": "  \n"}), "empty response"),
    ("not_an_object", json.dumps([1, 2]), "expected a JSON object"),
]


@pytest.mark.parametrize(("reason", "line", "message"), BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_bad_row_error_names_file_line_and_problem(tmp_path, reason, line, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n")  # blank line 2 is skipped
    with pytest.raises(DataError) as err:
        load_instructions(str(path), verbose=False)
    text = str(err.value)
    assert text.startswith(f"{path}:3: ") and message in text and "\n" not in text


def test_bad_rows_dropped_and_counted(tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps(GOOD)] + [b[1] for b in BAD_LINES] + [json.dumps(GOOD)]
    path.write_text("\n".join(lines) + "\n")
    res = load_instructions(str(path), on_bad_row="drop")
    assert res.drop_counts == {b[0]: 1 for b in BAD_LINES}
    assert res.duplicates == 1 and len(res.examples) == 2  # duplicates kept without dedupe
    assert [e.source_line for e in res.examples] == [1, len(lines)]
    out = capsys.readouterr().out
    assert "invalid_json=1" in out and "exact duplicates found: 1" in out


def test_json_array_and_invalid_json_document(tmp_path):
    good = tmp_path / "rows.json"
    good.write_text(json.dumps([GOOD, {**GOOD, "response": 3}]))
    with pytest.raises(DataError, match=r"rows\.json:2: field 'response' must be a string"):
        load_instructions(str(good), verbose=False)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"instruction": "a",\n "response": }\n]')
    with pytest.raises(DataError, match=r"broken\.json:3: invalid JSON"):
        load_instructions(str(broken), verbose=False)


def test_parquet_with_field_mapping(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(
        pa.table(
            {"q": ["What is 1+1?", "Name a colour."], "a": ["2", "Blue."], "user": ["u1", "u2"]}
        ),
        path,
    )
    res = load_instructions(
        str(path),
        fields={
            "instruction": "q",
            "response": "a",
            "context": "",
            "category": "",
            "group": "user",
        },
        verbose=False,
    )
    assert [(e.instruction, e.context, e.response, e.category, e.group) for e in res.examples] == [
        ("What is 1+1?", "", "2", "", "u1"),
        ("Name a colour.", "", "Blue.", "", "u2"),
    ]
    with pytest.raises(DataError, match="missing field 'context'.*data.fields.context=''"):
        load_instructions(str(path), fields={"instruction": "q", "response": "a"}, verbose=False)


def test_path_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="HF_HUB_OFFLINE.*not tried"):
        load_dolly("databricks/databricks-dolly-15k")
    with pytest.raises(DataError, match="no such file"):
        load_instructions(str(tmp_path / "missing.jsonl"))
    (tmp_path / "rows.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        load_instructions(str(tmp_path / "rows.txt"))
    with pytest.raises(DataError, match="data.fields.answer: unknown field"):
        load_instructions(str(tmp_path / "rows.txt"), fields={"answer": "a"})
    with pytest.raises(DataError, match="data.on_bad_row='skip': allowed values are error, drop"):
        load_dolly(on_bad_row="skip")
