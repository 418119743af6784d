"""Batches (train rounds, eval chunks) and the prepare_federated_data entry point."""

from __future__ import annotations

import collections
import gzip
import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from fedlora_jax.data import (
    DataConfig,
    DataError,
    client_round_batches,
    eval_loss_batches,
    eval_prompt_batches,
    load_dolly,
    prepare_federated_data,
    stack_clients,
    tokenize_examples,
)
from fedlora_jax.data.sources import resource_path


@pytest.fixture(scope="module")
def tok(stories_dir):
    return AutoTokenizer.from_pretrained(stories_dir)


@pytest.fixture(scope="module")
def rows():
    return load_dolly(verbose=False).examples[::300]  # 51 rows, every category


@pytest.fixture(scope="module")
def ts(rows, tok):
    return tokenize_examples(rows[:12], tok, max_seq_len=512)[0]


def round_batches(ts, **kw):
    args = {"steps": 2, "batch_size": 2, "seq_len": 512, "seed": 0, "round": 0, "client_id": 0}
    return client_round_batches(ts, **{**args, **kw})


def test_round_batches_shapes_masks_determinism(ts):
    b = round_batches(ts)
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
        k: ((2, 2, 512), np.int32) for k in ("tokens", "loss_mask", "attn_mask")
    }
    # Every sampled row is one of the set's rows with its own masks.
    for tokens, loss, attn in zip(*(b[k].reshape(4, 512) for k in b), strict=True):
        i = next(i for i in range(len(ts)) if np.array_equal(ts.tokens[i], tokens))
        assert np.array_equal(loss, ts.loss_mask()[i]) and np.array_equal(attn, ts.attn_mask()[i])
    same = round_batches(ts)
    assert all(np.array_equal(b[k], same[k]) for k in b)
    for change in ({"round": 1}, {"client_id": 1}, {"seed": 1}):
        assert not np.array_equal(b["tokens"], round_batches(ts, **change)["tokens"]), change


def test_epoch_stream_covers_rows_once_per_epoch(ts):
    # 12 rows, 4 per round: rounds 0-2 are one epoch (each row once), rounds 3-5 the next.
    def seen(r):
        toks = round_batches(ts, round=r)["tokens"].reshape(4, 512)
        return [next(i for i in range(12) if np.array_equal(ts.tokens[i], t)) for t in toks]

    epoch0 = seen(0) + seen(1) + seen(2)
    epoch1 = seen(3) + seen(4) + seen(5)
    assert sorted(epoch0) == list(range(12)) == sorted(epoch1) and epoch0 != epoch1


def test_small_client_repeats_rows(ts):
    small = ts.take(np.arange(3))
    toks = round_batches(small, steps=4).pop("tokens").reshape(8, 512)
    counts = collections.Counter(
        next(i for i in range(3) if np.array_equal(small.tokens[i], t)) for t in toks
    )
    assert sorted(counts.values()) == [2, 3, 3]


def test_seq_len_padding_and_error(ts):
    wide = round_batches(ts, seq_len=600)
    assert wide["tokens"].shape[-1] == 600 and (wide["attn_mask"][..., 512:] == 0).all()
    with pytest.raises(DataError, match="seq_len=32: shorter than the longest row"):
        round_batches(ts, seq_len=32)


def test_stack_clients(ts):
    stacked = stack_clients([round_batches(ts, client_id=k) for k in range(3)])
    assert stacked["tokens"].shape == (3, 2, 2, 512)
    assert np.array_equal(stacked["loss_mask"][1], round_batches(ts, client_id=1)["loss_mask"])


def test_eval_loss_batches(ts):
    b = eval_loss_batches(ts, chunk_size=5, seq_len=512)
    assert b["tokens"].shape == (3, 5, 512) and b["valid"].tolist() == [
        [1] * 5,
        [1] * 5,
        [1, 1, 0, 0, 0],
    ]
    assert b["row_ids"].reshape(-1).tolist() == ts.row_ids.tolist() + [-1, -1, -1]
    assert np.array_equal(b["loss_mask"].reshape(15, 512)[:12], ts.loss_mask())
    assert b["loss_mask"][2, 2:].sum() == 0  # padding rows never count


def test_eval_prompt_batches_left_padded(rows, tok):
    prompts, _ = tokenize_examples(rows[:7], tok, max_seq_len=512, with_response=False)
    b = eval_prompt_batches(prompts, chunk_size=4)
    width = int(prompts.prompt_lengths.max())
    assert b["tokens"].shape == (2, 4, width) and b["valid"].sum() == 7
    for j in range(7):
        c, r = divmod(j, 4)
        n = prompts.prompt_lengths[j]
        assert b["attn_mask"][c, r].tolist() == [0] * (width - n) + [1] * n
        assert b["tokens"][c, r, width - n :].tolist() == prompts.tokens[j, :n].tolist()
        assert b["tokens"][c, r, width - n] == tok.bos_token_id
    fixed = eval_prompt_batches(prompts, chunk_size=4, prompt_len=width + 3)
    assert fixed["tokens"].shape[-1] == width + 3
    with pytest.raises(DataError, match="shorter than the longest prompt"):
        eval_prompt_batches(prompts, chunk_size=4, prompt_len=width - 1)


@pytest.fixture(scope="module")
def small_dolly(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("data") / "dolly_small.jsonl"
    fields = ("instruction", "context", "response", "category")
    path.write_text(
        "".join(
            json.dumps({f: getattr(e, f) for f in fields}) + "\n"
            for e in load_dolly(verbose=False).examples[::50]
        )
    )  # 301 rows
    return path


def test_prepare_federated_data(small_dolly, tok):
    cfg = {
        "source": "path",
        "path": str(small_dolly),
        "num_clients": 4,
        "alpha": 0.5,
        "min_client_size": 5,
        "max_seq_len": 256,
        "test_fraction": 0.1,
        "test_cap": 4,
        "seed": 0,
    }
    fd = prepare_federated_data(cfg, tok, verbose=False)
    assert len(fd.clients) == 4 and fd.global_test is None
    train = np.concatenate([c.train_rows for c in fd.clients])
    test = np.concatenate([c.test.rows for c in fd.clients])
    assert len(np.intersect1d(train, test)) == 0
    # Every row that tokenises within max_seq_len is used exactly once; the rest are counted.
    fits = tokenize_examples(fd.examples, tok, max_seq_len=256)[0].row_ids
    assert np.array_equal(np.sort(np.concatenate([train, test])), fits)
    assert fd.drop_counts.get("too_long", 0) == 301 - len(fits)
    assert fd.table.counts.sum() == 301 and fd.table.counts.shape == (4, 8)
    assert fd.weights.tolist() == [c.num_train for c in fd.clients]
    for c in fd.clients:
        assert 1 <= len(c.test.rows) <= 4 and c.train.width == 256
        assert np.array_equal(c.test.full.row_ids, c.test.rows)
        assert np.array_equal(c.test.prompts.row_ids, c.test.rows)
        assert c.train.row_ids.tolist() == c.train_rows.tolist()
    refs = fd.references(np.array([fd.clients[0].test.rows[0], -1]))
    assert refs == [(fd.examples[fd.clients[0].test.rows[0]].response,)]
    again = prepare_federated_data(cfg, tok, verbose=False)
    assert [c.train_rows.tolist() for c in again.clients] == [
        c.train_rows.tolist() for c in fd.clients
    ]


def test_prepare_by_task_with_alias(tmp_path, tok, read_shipped_lines):
    lines = read_shipped_lines("natural_instructions/ni_v1_16tasks.jsonl.gz")
    per_task = collections.defaultdict(list)
    for line in lines:
        per_task[json.loads(line)["task"]].append(line)
    path = tmp_path / "ni.jsonl"
    path.write_text("\n".join(x for v in per_task.values() for x in v[:6]) + "\n")
    fd = prepare_federated_data(
        {
            "source": "natural_instructions",
            "path": str(path),
            "partition": "task",
            "num_clients": 4,
            "max_seq_len": 512,
            "test_cap": 1,
        },
        tok,
        verbose=False,
    )
    assert fd.config.partition == "by_task"
    groups = [
        {fd.examples[i].group for i in np.concatenate([c.train_rows, c.test.rows])}
        for c in fd.clients
    ]
    assert [len(g) for g in groups] == [4, 4, 4, 4] and len(set().union(*groups)) == 16


def raw_ni_rows() -> list[dict]:
    """The shipped NI file read directly, independent of the data module's loader."""
    path = resource_path("natural_instructions", "ni_v1_16tasks.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_include_keeps_exactly_the_listed_tasks_and_categories(tok):
    keep = ("task045_miscellaneous_sentence_paraphrasing", "verification")
    fd = prepare_federated_data(
        {
            "source": "natural_instructions",
            "include": f" {keep[0]} ,{keep[1]},",  # spaces and an empty item are ignored
            "partition": "task",
            "num_clients": 0,
            "max_seq_len": 512,
        },
        tok,
        verbose=False,
    )
    assert fd.config.include == keep
    expected = collections.Counter(
        r["task"] for r in raw_ni_rows() if r["task"] == keep[0] or r["category"] == keep[1]
    )
    assert len(expected) == 3 and sum(expected.values()) == 793  # 193 + 2 verification x 300
    assert collections.Counter(ex.group for ex in fd.examples) == expected
    # One client per kept task (num_clients=0), holding all of that task's rows.
    rows = [np.concatenate([c.train_rows, c.test.rows]) for c in fd.clients]
    held = [collections.Counter(fd.examples[i].group for i in r) for r in rows]
    assert sorted(held, key=lambda c: min(c)) == [
        collections.Counter({t: n}) for t, n in sorted(expected.items())
    ]


def test_include_names_unknown_values_in_one_line(tok):
    cfg = {"source": "natural_instructions", "include": "task999_nope,classification,qa"}
    with pytest.raises(DataError) as err:
        prepare_federated_data(cfg, tok, verbose=False)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        "data.include: unknown task999_nope, qa; allowed: answer_generation, classification, "
    )
    assert message.count("task0") == 16  # every task is listed, with the 6 categories


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"partition": "random"}, "data.partition='random': allowed values are iid, by_category"),
        ({"source": "hub"}, "data.source='hub': allowed values are dolly, natural_instructions"),
        ({"num_clients": -1}, "data.num_clients=-1: must be an integer >= 0"),
        ({"alpha": 0}, "data.alpha=0: must be a number > 0"),
        ({"test_fraction": 1.5}, r"data.test_fraction=1.5: must be in \[0, 1\)"),
        ({"clients": 4}, "data.clients: unknown key; allowed: alpha"),
        ({"partition": "by_column"}, "set data.fields.group"),
        ({"max_prompt_len": 600}, "data.max_prompt_len=600: must be <= data.max_seq_len=256"),
        ({"include": 5}, "data.include=5: must be a comma-separated string of names"),
    ],
)
def test_config_errors(cfg, message):
    with pytest.raises(DataError, match=message):
        DataConfig.from_mapping(cfg)


def test_config_from_configdict():
    from ml_collections import ConfigDict

    cfg = DataConfig.from_mapping(ConfigDict({"partition": "category", "num_clients": 4}))
    assert (cfg.partition, cfg.num_clients, cfg.alpha) == ("by_category", 4, 0.5)
