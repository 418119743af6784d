"""Config mistakes and failing runs end in one clear line and lose nothing (issue 11, item 6).

Config mistakes go through ``scripts/train.py``'s ``main`` in-process (they fail before any model
is loaded). The failing run is the smoke preset on a 1,500-row Dolly file with three bad rows
(``data.on_bad_row=drop``), trained at lr 1e38 without gradient clipping: stories260K's clients
then all send non-finite adapters in round 1. It runs once through the CLI in a subprocess
(exit status, message, run directory) and, for the other ``run.on_no_valid_client`` modes,
in-process on one shared ``Setup``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
import pathlib
import subprocess
import sys

import pytest

from fedlora_jax import runner
from fedlora_jax.config import ConfigError, load_config
from fedlora_jax.data.rows import Example
from fedlora_jax.data.tokenize import tokenize_examples
from fedlora_jax.logging import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = f"{REPO / 'configs' / 'dolly.py'}:smoke"
DOLLY = REPO / "fedlora_jax" / "resources" / "data" / "dolly" / "databricks-dolly-15k.jsonl.gz"
DIVERGE = ("optim.lr=1e38", "optim.grad_clip=0", "data.on_bad_row=drop")
BAD_ROWS = 3  # written into the data file by ``bad_dolly``
LONG_WARNING = "Token indices sequence length is longer"


def _train_module():
    spec = importlib.util.spec_from_file_location("train_cli", REPO / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAIN = _train_module()


def _strict(line: str) -> dict:
    """json.loads that rejects NaN / Infinity (Python's json accepts them by default)."""

    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def _cli_error(capsys, *argv: str) -> tuple[int, list[str]]:
    """(exit status, stderr lines) of ``train.py`` run in-process."""
    try:
        rc = TRAIN.main([*argv, "--no_progress"])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    return rc, capsys.readouterr().err.strip().splitlines()


# ----------------------------------------------------------------------------- config mistakes


@pytest.mark.parametrize(
    ("override", "expected", "not_expected"),
    [
        ("optim.lr=1e400", ["optim.lr=inf", "finite"], []),
        ("optim.lr=-1e400", ["optim.lr=-inf", "finite"], []),
        ("data.num_clients=-2", ["data.num_clients=-2", ">= 0"], ["clients_per_round"]),
        ("adapter.targets=([", ["adapter.targets='(['", "unterminated character set"], []),
        ("optim.lrr=1", ["unknown config key 'optim.lrr'", "grad_clip, lr,"], []),
        ("federated.rounds=two", ["'federated.rounds' expects int", "'two'"], []),
        ("optim.lr=nan", ["'optim.lr' expects float", "'nan'"], []),
        ("federated.clients_per_round=9", ["clients_per_round=9", "data.num_clients=4"], []),
        ("eval.batch_size=0", ["eval.batch_size=0", ">= 1"], []),
        ("run.on_no_valid_client=ignore", ["run.on_no_valid_client='ignore'", "error, stop"], []),
    ],
)
def test_config_mistake_is_one_line(capsys, override, expected, not_expected) -> None:
    rc, err = _cli_error(capsys, "--config", SMOKE, f"--config.{override}")
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    for text in expected:
        assert text in err[0]
    for text in not_expected:
        assert text not in err[0]


def test_every_float_must_be_finite_wherever_it_is() -> None:
    """The check walks every float of the config, builder options included."""
    for override in ("adapter.alpha=1e999", "data.alpha=-1e999", "algorithm.options.beta=1e999"):
        key = override.split("=")[0]
        with pytest.raises(ConfigError, match=rf"^{key}=-?inf is not valid; must be a finite"):
            load_config(SMOKE, [override])


def test_unknown_preset_and_broken_config_files(capsys, tmp_path: pathlib.Path) -> None:
    rc, err = _cli_error(capsys, "--config", f"{REPO / 'configs' / 'dolly.py'}:smok")
    assert rc == 2 and len(err) == 1
    assert "dolly.py: unknown preset 'smok'; allowed: default, " in err[0]
    allowed = err[0].split("allowed: ")[1].split("  (")[0].split(", ")
    assert {"default", "smoke", "dp"} <= set(allowed)

    syntax = tmp_path / "syntax.py"
    syntax.write_text("from ml_collections import ConfigDict\n\ndef get_config(:\n")
    rc, err = _cli_error(capsys, "--config", str(syntax))
    assert rc == 2 and len(err) == 1
    assert f"error: {syntax}:3: SyntaxError: invalid syntax" in err[0]

    raising = tmp_path / "raising.py"
    raising.write_text("def get_config(preset='default'):\n    return {}['model']\n")
    rc, err = _cli_error(capsys, "--config", str(raising))
    assert rc == 2 and len(err) == 1
    assert f"error: {raising}:2: KeyError: 'model'" in err[0]

    rc, err = _cli_error(capsys, "--config", str(tmp_path / "absent.py"))
    assert rc == 2 and err == [f"error: --config: file '{tmp_path / 'absent.py'}' not found  "
                               "(--debug shows the traceback)"]  # fmt: skip


def test_override_without_value_is_refused(capsys) -> None:
    """``--config.federated.rounds --config.x=1`` used to take the next flag as the value."""
    rc, err = _cli_error(capsys, "--config", SMOKE, "--config.federated.rounds", "--resume")
    assert rc == 2
    assert err[-1].endswith("error: --config.federated.rounds: missing value")


def test_missing_model_says_where_it_looked_and_what_to_run(capsys, tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    rc, err = _cli_error(
        capsys, "--config", SMOKE, f"--config.model.spec={missing}",
        f"--config.run.out_dir={tmp_path / 'runs'}",
    )  # fmt: skip
    assert rc == 2 and len(err) == 1
    assert f"no local path '{missing}'" in err[0]
    assert "not an alias (stories260k, smollm2-135m" in err[0]
    assert "hf download" in err[0]


# ----------------------------------------------------------------------------- failing runs


@pytest.fixture(scope="module")
def bad_dolly(tmp_path_factory) -> pathlib.Path:
    """The first 1,500 shipped Dolly rows with three bad rows in the middle."""
    with gzip.open(DOLLY, "rt") as f:
        rows = [json.loads(next(f)) for _ in range(1500)]
    bad = [
        dict(rows[0], response=5),  # non_string_field
        {k: v for k, v in rows[1].items() if k != "response"},  # missing_field
        dict(rows[2], instruction="  "),  # empty_instruction
    ]
    assert len(bad) == BAD_ROWS
    path = tmp_path_factory.mktemp("data") / "dolly_bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:700] + bad + rows[700:]))
    return path


def _overrides(data: pathlib.Path, out_dir: pathlib.Path, *more: str) -> list[str]:
    return [*DIVERGE, f"data.path={data}", f"run.out_dir={out_dir}", *more]


@pytest.fixture(scope="module")
def diverging(bad_dolly, tmp_path_factory):
    """The Setup (model, data, algorithm) of the diverging config, for in-process runs."""
    cfg = load_config(SMOKE, _overrides(bad_dolly, tmp_path_factory.mktemp("unused")))
    return runner.build(cfg, verbose=False)


@pytest.fixture(scope="module")
def cli_run(bad_dolly, tmp_path_factory) -> subprocess.CompletedProcess:
    """The CLI on the diverging config with the default run.on_no_valid_client ("error")."""
    out = tmp_path_factory.mktemp("cli")
    flags = [f"--config.{o}" for o in _overrides(bad_dolly, out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "--config", SMOKE, *flags,
         "--no_progress"],
        capture_output=True, text=True, env=env, timeout=900, cwd=REPO,
    )  # fmt: skip
    proc.run_dir = out / "dolly-smoke-fedit-seed0"
    return proc


def test_no_valid_client_stops_with_checkpoint_and_one_error_line(cli_run) -> None:
    assert cli_run.returncode == 3, cli_run.stderr
    errors = [line for line in cli_run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and cli_run.stderr.strip().endswith(errors[0])
    assert errors[0].startswith(
        "error: round 1: no valid client (phase train: clients [0, 1, 2, 3]"
    )
    assert "run.on_no_valid_client='error'" in errors[0]
    assert sorted(p.name for p in (cli_run.run_dir / "checkpoints").iterdir()) == ["1"]
    assert not (cli_run.run_dir / "final_eval.json").exists()


def test_metrics_jsonl_is_strict_json_with_excluded_clients(cli_run) -> None:
    lines = (cli_run.run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [_strict(line) for line in lines]
    assert [r["round"] for r in rows] == [1]
    assert rows[0]["clients"] == [0, 1, 2, 3]
    assert rows[0]["phase/train/excluded"] == [0, 1, 2, 3]
    assert rows[0]["train/loss"] is None  # the mean over no valid client: null, not NaN


def test_results_md_shows_the_stop_and_the_excluded_clients(cli_run) -> None:
    text = (cli_run.run_dir / "results.md").read_text()
    assert "**Stopped: round 1: no valid client" in text
    assert "round(s) 1 had no valid client; the model was not trained in them" in text
    assert "- round 1: train: 0, 1, 2, 3 (every sampled client: no valid client)" in text
    assert "_no final evaluation_" in text


def test_drop_counts_in_the_log_and_results_md(cli_run, diverging) -> None:
    counts = diverging.data.drop_counts
    assert sum(counts.values()) == BAD_ROWS, counts
    expected = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    first = cli_run.stdout.splitlines()[0]
    assert first.startswith("[data] rows dropped: ") and expected in first
    assert expected in (cli_run.run_dir / "results.md").read_text()


def test_no_misleading_token_length_warning_in_a_run(cli_run) -> None:
    assert LONG_WARNING not in cli_run.stdout + cli_run.stderr


def test_tokenisation_silences_only_its_own_length_warning(diverging) -> None:
    """Our tokenisation fits rows to max_seq_len, so transformers' warning about sequences longer
    than the model is noise there; the tokenizer itself still warns when called directly."""
    tok = diverging.tokenizer
    text = "word " * (2 * tok.model_max_length)
    ex = Example(instruction="Repeat.", context="", response=text, category="x", source_line=1)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        tok.deprecation_warnings.pop("sequence-length-is-longer-than-the-specified-maximum", None)
        tokenize_examples([ex], tok, max_seq_len=64, min_response_tokens=1)
        assert not [r for r in records if LONG_WARNING in r.getMessage()]
        tok(text)  # the control: this capture does see the warning
        assert [r for r in records if LONG_WARNING in r.getMessage()]
    finally:
        hf_logger.removeHandler(handler)


def test_stop_mode_ends_cleanly_and_continue_mode_records_every_round(
    diverging, bad_dolly, tmp_path: pathlib.Path, capsys
) -> None:
    cfg = load_config(
        SMOKE, _overrides(bad_dolly, tmp_path / "stop", "run.on_no_valid_client=stop")
    )
    stopped = runner.run(cfg, setup=diverging, progress=False)
    assert stopped.state.round == 1 and stopped.final_eval is None
    assert stopped.stopped.startswith("round 1: no valid client")
    assert f"warning: {stopped.stopped}" in capsys.readouterr().err
    assert "**Stopped: round 1" in (stopped.run_dir / "results.md").read_text()

    cfg = load_config(
        SMOKE, _overrides(bad_dolly, tmp_path / "go", "run.on_no_valid_client=continue")
    )
    done = runner.run(cfg, setup=diverging, progress=False)
    assert done.stopped is None and done.state.round == 2
    rows = [_strict(x) for x in (done.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase/train/excluded"] for r in rows] == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert rows == read_metrics(done.run_dir)
    final = _strict((done.run_dir / "final_eval.json").read_text())
    assert final["round"] == 2
    assert final["data"]["drop_counts"] == diverging.data.drop_counts
    text = (done.run_dir / "results.md").read_text()
    assert "round(s) 1, 2 had no valid client" in text
    assert "- round 2: train: 0, 1, 2, 3" in text
    assert "## Final evaluation" in text and "_no final evaluation_" not in text
