"""End-to-end: the smoke preset (stories260K, 4 clients, 2 rounds) through the runner.

One ``Setup`` (model, data, algorithm) is shared by every run in this module so the round and
evaluation functions compile once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from fedlora_jax import runner
from fedlora_jax.config import ConfigError, load_config
from fedlora_jax.logging import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = f"{REPO / 'configs' / 'dolly.py'}:smoke"


def _cfg(out_dir: pathlib.Path, *overrides: str):
    return load_config(SMOKE, [f"run.out_dir={out_dir}", *overrides])


@pytest.fixture(scope="module")
def setup():
    return runner.build(load_config(SMOKE), verbose=False)


@pytest.fixture(scope="module")
def full_run(setup, tmp_path_factory):
    """The uninterrupted smoke run."""
    return runner.run(_cfg(tmp_path_factory.mktemp("full")), setup=setup, progress=False)


def _without_times(history: list[dict]) -> list[dict]:
    """Rows without the wall-clock entries (and the round key metrics.jsonl adds)."""
    return [
        {k: v for k, v in row.items() if not k.startswith("time/") and k != "round"}
        for row in history
    ]


def test_run_dir_has_every_artifact(full_run) -> None:
    d = full_run.run_dir
    assert d.name == "dolly-smoke-fedit-seed0"
    for name in ("config.json", "clients.csv", "metrics.jsonl", "final_eval.json", "results.md"):
        assert (d / name).is_file(), name
    assert (d / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert list((d / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["1", "2"]
    saved = json.loads((d / "config.json").read_text())
    assert saved["model"]["spec"] == "stories260k"
    assert saved["adapter"]["kind"] == "lora"  # "auto" resolved for FedIT
    rows = read_metrics(d)
    assert [r["round"] for r in rows] == [1, 2]
    for key in ("train/loss", "global/rouge_l", "personal/rouge_l/mean", "comm/up_bytes",
                "time/round_cpu_s"):  # fmt: skip
        assert all(np.isfinite(r[key]) for r in rows), key
    assert rows[0]["comm/up_bytes"] > 0
    final = json.loads((d / "final_eval.json").read_text())
    assert final["round"] == 2
    assert final["global"]["metrics"]["rouge_l"] == pytest.approx(rows[-1]["global/rouge_l"])
    assert "## Per round" in (d / "results.md").read_text()


def test_training_loss_goes_down(full_run) -> None:
    rows = read_metrics(full_run.run_dir)
    assert rows[1]["train/loss"] < rows[0]["train/loss"]


def test_stop_and_resume_is_bitwise_identical(setup, full_run, tmp_path: pathlib.Path) -> None:
    cfg = _cfg(tmp_path)
    first = runner.run(cfg, setup=setup, progress=False, stop_after_round=1)
    assert first.final_eval is None and first.state.round == 1
    assert not (first.run_dir / "results.md").exists()
    resumed = runner.run(cfg, setup=setup, progress=False, resume=True)
    assert resumed.state.round == 2
    a, b = jax.tree.leaves(full_run.state), jax.tree.leaves(resumed.state)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert _without_times(resumed.history) == _without_times(full_run.history)
    assert _without_times(read_metrics(resumed.run_dir)) == _without_times(full_run.history)
    assert resumed.final_eval == full_run.final_eval


def test_stop_saves_its_round_and_last_round_is_evaluated_once(
    setup, tmp_path: pathlib.Path, monkeypatch
) -> None:
    """A time-limited stop checkpoints the round it stopped at even when checkpoint.every does
    not divide it, and the final report reuses the last round's evaluation."""
    calls: list[int] = []
    real = runner.evaluate_state

    def counting(cfg, setup_, state):
        calls.append(int(state.round))
        return real(cfg, setup_, state)

    monkeypatch.setattr(runner, "evaluate_state", counting)
    cfg = _cfg(tmp_path, "checkpoint.every=0", "eval.every=0")
    first = runner.run(cfg, setup=setup, progress=False, stop_after_round=1)
    assert sorted(p.name for p in (first.run_dir / "checkpoints").iterdir()) == ["1"]
    assert calls == []
    done = runner.run(cfg, setup=setup, progress=False, resume=True)
    assert calls == [2]  # once, in round 2; the final report reuses it
    assert done.final_eval["round"] == 2


def test_user_mistakes_are_config_errors(setup, full_run, tmp_path: pathlib.Path) -> None:
    out = full_run.run_dir.parent
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        runner.run(_cfg(out), setup=setup, progress=False)
    with pytest.raises(ConfigError, match=r"differs from .* in optim.lr; only federated.rounds"):
        runner.run(_cfg(out, "optim.lr=0.1"), setup=setup, progress=False, resume=True)
    with pytest.raises(ConfigError, match="algorithm.options.bogus is not an option of fedit"):
        runner.build_algorithm(_cfg(tmp_path, "algorithm.options.bogus=1"), setup.training, 4)
    with pytest.raises(ValueError, match="algorithm.name='nope' is not known; allowed: "):
        runner.build_algorithm(_cfg(tmp_path, "algorithm.name=nope"), setup.training, 4)


def test_run_length_reaches_the_algorithm_through_round_info(setup, tmp_path) -> None:
    """local_phase=final needs the run length: the engine config carries federated.rounds (the
    algorithms read RoundInfo.total_rounds); it is no algorithm option."""
    final = ("algorithm.name=fedlora_optimizer", "algorithm.options.local_phase=final")
    cfg = _cfg(tmp_path, *final, "federated.rounds=5")
    assert runner.engine_config(cfg).rounds == 5
    training = runner.client_training(cfg, setup.model_cfg)
    assert runner.build_algorithm(cfg, training, 4).name == "fedlora_optimizer"
    cfg = _cfg(tmp_path, *final, "algorithm.options.rounds=5")
    with pytest.raises(ConfigError, match="algorithm.options.rounds is not an option"):
        runner.build_algorithm(cfg, training, 4)


def test_evaluate_checkpoint_matches_the_final_report(setup, full_run) -> None:
    report = runner.evaluate_checkpoint(full_run.run_dir, setup=setup)
    assert report == full_run.final_eval
    with pytest.raises(ConfigError, match="only eval"):
        runner.evaluate_checkpoint(full_run.run_dir, overrides=["optim.lr=1"], setup=setup)


def _train_main():
    spec = importlib.util.spec_from_file_location("train_script", REPO / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_train_script_prints_one_line_errors(capsys, tmp_path: pathlib.Path) -> None:
    main = _train_main()
    assert main(["--config", SMOKE, "--config.federated.backend=pmap"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: federated.backend='pmap' is not valid; allowed: vmap")
    assert "\n" not in err
    assert main(["--config", str(tmp_path / "none.py")]) == 2
    assert "not found" in capsys.readouterr().err


def test_train_script_smoke_subprocess(read_shipped_lines, tmp_path: pathlib.Path) -> None:
    """The CLI end to end, on the first 200 real Dolly rows (tokenising all 15k rows would
    double this test's time; the in-process runs above use the full set)."""
    rows = read_shipped_lines("dolly/databricks-dolly-15k.jsonl.gz")[:200]
    subset = tmp_path / "dolly200.jsonl"
    subset.write_text("\n".join(rows) + "\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "--config", SMOKE, "--no_progress",
         f"--config.run.out_dir={tmp_path}", "--config.federated.rounds", "1",
         "--config.data.source=path", f"--config.data.path={subset}"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "round 1/1 | train loss" in proc.stdout
    assert (tmp_path / "dolly-smoke-fedit-seed0" / "results.md").is_file()
