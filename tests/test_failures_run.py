"""Failures a user can cause around a run (issue 11, item 4 and the run-directory, checkpoint,
generate and evaluate findings of item 6): each ends in one clear line, loses nothing, and the
next command simply works.

One finished smoke run (stories260K, 4 clients, 2 rounds; module fixture) is copied into each
test's tmp dir, which the test then damages. The CLI tests call the scripts' ``main`` in-process
with ``runner.build`` returning the shared setup, so nothing compiles twice.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import resource
import shutil
import signal

import jax
import numpy as np
import pytest

from fedlora_jax import runner
from fedlora_jax.checkpoint import Checkpointer, CheckpointError
from fedlora_jax.config import ConfigError, load_config
from fedlora_jax.logging import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = f"{REPO / 'configs' / 'dolly.py'}:smoke"
RUN_NAME = "dolly-smoke-fedit-seed0"


def _cfg(out_dir: pathlib.Path, *overrides: str):
    return load_config(SMOKE, [f"run.out_dir={out_dir}", *overrides])


def _script_main(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def setup():
    return runner.build(load_config(SMOKE), verbose=False)


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory):
    """The uninterrupted smoke run (checkpoints of rounds 1 and 2)."""
    return runner.run(_cfg(tmp_path_factory.mktemp("finished")), setup=setup, progress=False)


@pytest.fixture
def copied(finished, tmp_path: pathlib.Path) -> pathlib.Path:
    """A copy of the finished run's out_dir (resuming it changes only run.out_dir)."""
    out = tmp_path / "runs"
    shutil.copytree(finished.run_dir.parent, out)
    return out


@pytest.fixture
def shared_build(setup, monkeypatch):
    """``runner.build`` returns the module's setup: the scripts' ``main`` runs without
    rebuilding the model and data."""
    monkeypatch.setattr(runner, "build", lambda cfg, verbose=True: setup)


def _assert_same_state(a, b) -> None:
    x, y = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(x) == len(y)
    for u, v in zip(x, y, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


# ----------------------------------------------------------------------------- item 4


def test_failed_start_leaves_nothing_that_blocks_the_next(setup, tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(ValueError, match="missing.jsonl.: no such file"):
        runner.run(_cfg(tmp_path, "data.source=path", f"data.path={missing}"), progress=False)
    run_dir = tmp_path / RUN_NAME
    assert not (run_dir / "config.json").exists()
    assert list(run_dir.iterdir()) == []  # an empty directory: a new run may start in it
    again = runner.run(_cfg(tmp_path), setup=setup, progress=False, stop_after_round=1)
    assert again.state.round == 1 and (run_dir / "config.json").is_file()


def test_no_free_space_at_start_is_one_line_and_blocks_nothing(
    setup, tmp_path: pathlib.Path, monkeypatch
) -> None:
    """Checked before round 1 (room for checkpoint.keep=3 + 1 checkpoints), not at the first
    metrics or checkpoint write. The free space is patched at ``shutil.disk_usage``: filling a
    real disk needs root."""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(CheckpointError, match=r"4 checkpoints in .*/checkpoints: need [\d.]+ MB"):
        runner.run(_cfg(tmp_path), setup=setup, progress=False)
    assert not (tmp_path / RUN_NAME / "config.json").exists()


# ----------------------------------------------------------------------------- --resume


def test_resume_with_no_run_directory_is_an_error(setup, tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match=f"nothing to resume at {tmp_path / RUN_NAME}"):
        runner.run(_cfg(tmp_path), setup=setup, progress=False, resume=True)
    assert not (tmp_path / RUN_NAME).exists()


def test_resume_refuses_a_changed_seed(setup, copied: pathlib.Path) -> None:
    saved = copied / RUN_NAME / "config.json"
    before = saved.read_bytes()
    cfg = _cfg(copied, f"run.name={RUN_NAME}", "run.seed=1")
    with pytest.raises(ConfigError, match=r"differs from .*config.json in run.seed; only "):
        runner.run(cfg, setup=setup, progress=False, resume=True)
    assert saved.read_bytes() == before


def test_resume_a_run_saved_before_a_key_existed(setup, copied: pathlib.Path) -> None:
    """A config saved by an older version lacks keys added since: they read as the schema's
    defaults, so the run resumes; setting such a key to another value is a change."""
    saved = copied / RUN_NAME / "config.json"
    old = json.loads(saved.read_text())
    assert old["federated"].pop("packing") is True  # as if saved before federated.packing
    saved.write_text(json.dumps(old))
    # adapter.kind as run() resolves it before the check ("auto" -> lora for FedIT)
    cfg = _cfg(copied, f"run.name={RUN_NAME}", "federated.rounds=3", "adapter.kind=lora")
    runner._prepare_run_dir(copied / RUN_NAME, cfg, resume=True)  # no error
    unpacked = _cfg(copied, f"run.name={RUN_NAME}", "adapter.kind=lora", "federated.packing=False")
    with pytest.raises(ConfigError, match=r"differs from .*config.json in federated.packing;"):
        runner._prepare_run_dir(copied / RUN_NAME, unpacked, resume=True)
    old["federated"]["retired_key"] = 1  # a key this version no longer has
    saved.write_text(json.dumps(old))
    with pytest.raises(ConfigError, match=r"--resume: .*config.json: unknown config key "):
        runner._prepare_run_dir(copied / RUN_NAME, cfg, resume=True)


def test_rounds_may_not_change_when_the_schedule_depends_on_them(tmp_path) -> None:
    final = ("algorithm.name=fedlora_optimizer", "algorithm.options.local_phase=final")
    assert "federated.rounds" not in runner._resumable(_cfg(tmp_path, *final))
    every = ("algorithm.name=fedlora_optimizer", "algorithm.options.local_phase=every_round")
    assert "federated.rounds" in runner._resumable(_cfg(tmp_path, *every))
    assert "federated.rounds" in runner._resumable(_cfg(tmp_path))
    assert not any(k.startswith(("run.seed", "optim", "data")) for k in runner.RESUMABLE_CHANGES)


def test_resume_repairs_a_torn_metrics_line(setup, finished, copied: pathlib.Path) -> None:
    run_dir = copied / RUN_NAME
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-40])  # killed in the middle of round 2's line
    with pytest.raises(json.JSONDecodeError):
        read_metrics(run_dir)
    resumed = runner.run(_cfg(copied), setup=setup, progress=False, resume=True)
    assert read_metrics(run_dir) == read_metrics(finished.run_dir)
    assert resumed.final_eval == finished.final_eval


def test_corrupt_config_names_the_file(setup, copied: pathlib.Path) -> None:
    saved = copied / RUN_NAME / "config.json"
    saved.write_text(saved.read_text()[:100])
    match = f"{saved}: not valid JSON .* line"
    with pytest.raises(ConfigError, match=match):
        runner.run(_cfg(copied), setup=setup, progress=False, resume=True)
    with pytest.raises(ConfigError, match=match):
        runner.evaluate_checkpoint(copied / RUN_NAME, setup=setup)


def test_resume_falls_back_from_a_truncated_checkpoint(
    setup, finished, copied: pathlib.Path, caplog
) -> None:
    """Round 2's data files cut in half: the run resumes from round 1 with a warning naming
    round 2's checkpoint, trains round 2 again, and ends bitwise equal to the finished run."""
    ckpts = copied / RUN_NAME / "checkpoints"
    data = [f for f in (ckpts / "2" / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert data
    for f in data:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    resumed = runner.run(_cfg(copied), setup=setup, progress=False, resume=True)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"checkpoint {ckpts / '2'} (" in w and "using round 1" in w for w in warned), warned
    _assert_same_state(resumed.state, finished.state)
    assert (ckpts / "2.damaged").is_dir()
    assert sorted(p.name for p in ckpts.iterdir()) == ["1", "2", "2.damaged"]


# ----------------------------------------------------------------------------- run.out_dir


def _unwritable(tmp_path: pathlib.Path, case: str) -> tuple[str, str]:
    """(run.out_dir, expected reason) for each way the run directory cannot be written."""
    if case == "file":
        (tmp_path / "a_file").write_text("x")
        return str(tmp_path / "a_file"), "Not a directory"
    if case == "sys":
        return "/sys/fedlora_jax_test", "Operation not permitted"
    if os.geteuid() == 0:  # root writes through mode bits; /proc refuses new entries to anyone
        return "/proc/self/fedlora_jax_test", "No such file or directory"
    ro = tmp_path / "read_only"
    ro.mkdir(mode=0o555)
    return str(ro), "Permission denied"


@pytest.mark.parametrize("case", ["file", "sys", "read_only"])
def test_unwritable_out_dir_is_one_line(case: str, tmp_path: pathlib.Path, capsys) -> None:
    out_dir, reason = _unwritable(tmp_path, case)
    assert _script_main("train")(["--config", SMOKE, f"--config.run.out_dir={out_dir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: run.out_dir={out_dir!r}: cannot write the run directory")
    assert reason in err and "\n" not in err


# ----------------------------------------------------------------------------- disk full


def test_disk_full_during_async_checkpoint_save(
    finished, copied: pathlib.Path, shared_build, capfd
) -> None:
    """A real failed write: RLIMIT_FSIZE (SIGXFSZ ignored) makes every write past 12 kB fail
    with EFBIG, which round 3's checkpoint data files (~18 kB) exceed while the run's other
    files stay under it. The CLI prints one line naming the checkpoint and the space it needs,
    no thread tracebacks, and round 2's checkpoint stays usable."""
    argv = ["--config", SMOKE, f"--config.run.out_dir={copied}", "--config.federated.rounds=3",
            "--resume", "--no_progress"]  # fmt: skip
    main = _script_main("train")
    capfd.readouterr()
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (12_000, hard))
    try:
        code = main(argv)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    err = capfd.readouterr().err
    ckpts = copied / RUN_NAME / "checkpoints"
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint {ckpts / '3'} could not be written: File too large")
    assert "of free space" in last and f"checkpoint {ckpts / '2'} is intact" in last
    with Checkpointer(ckpts, keep=3) as ck:
        assert ck.latest_step() == 2
        state, meta = ck.restore(finished.state)
    assert meta["round"] == 2
    _assert_same_state(state, finished.state)


# ----------------------------------------------------------------------------- evaluate.py


@pytest.mark.parametrize(
    ("key", "value", "held", "asked"),
    [
        ("adapter.r", 8, "rank=4", "rank=8"),
        ("algorithm.name", "fedsa_lora", "algorithm=fedit", "algorithm=fedsa_lora"),
    ],
)
def test_evaluate_a_checkpoint_of_another_config(
    key: str, value, held: str, asked: str, copied: pathlib.Path, capsys
) -> None:
    """The run's config.json edited after training: one line before any model is loaded."""
    run_dir = copied / RUN_NAME
    saved = json.loads((run_dir / "config.json").read_text())
    section, name = key.split(".")
    saved[section][name] = value
    (run_dir / "config.json").write_text(json.dumps(saved))
    assert _script_main("evaluate")(["--run_dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith(f"error: {run_dir / 'checkpoints' / '2'}: the checkpoint holds ")
    holds, asks = err.split("; the config asks for ")
    assert held in holds and asked in asks


def test_a_checkpoint_without_identity_that_does_not_fit_is_one_line(tmp_path) -> None:
    """Checkpoints written before meta recorded the identity: the orbax mismatch becomes one
    line naming the checkpoint."""
    state = {"A": np.ones((4, 2), np.float32), "round": 1}
    with Checkpointer(tmp_path, keep=2) as ck:
        ck.save(1, state, {"round": 1})
    identity = {"algorithm": "fedit", "adapter": "lora", "rank": 8}
    with Checkpointer(tmp_path, keep=2, identity=identity) as ck:
        ck.check_identity()  # nothing recorded: passes, the restore decides
        with pytest.raises(CheckpointError) as e:
            ck.restore({"A": np.ones((8, 2), np.float32), "round": 0})
    msg = str(e.value)
    assert "\n" not in msg and f"{tmp_path / '1'} (" in msg and "rank=8" in msg


# ----------------------------------------------------------------------------- generate.py


def test_generate_names_an_invalid_adapter_config(tmp_path: pathlib.Path, capsys) -> None:
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 4, "lora_alpha": ')
    (folder / "adapter_model.safetensors").write_bytes(b"")
    argv = ["--model", "stories260k", "--adapters", str(folder), "--prompt", "Tom had"]
    assert _script_main("generate")(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {folder / 'adapter_config.json'}: not valid JSON")
    assert "\n" not in err


def test_generate_refuses_a_prompt_past_the_model_positions(capsys) -> None:
    argv = ["--model", "stories260k", "--prompt", "Tom had a dog. " * 200]
    assert _script_main("generate")(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "exceeds the model's 512 positions (max_position_embeddings)" in err
    assert "\n" not in err


def test_prompt_positions_boundary() -> None:
    spec = importlib.util.spec_from_file_location("generate_script", REPO / "scripts/generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.check_positions([[1] * 500, [1] * 3], max_new_tokens=12, positions=512)  # 512: fits
    with pytest.raises(ValueError, match=r"--prompt #1 is 500 tokens; with --max-new-tokens 13"):
        module.check_positions([[1] * 500, [1] * 3], max_new_tokens=13, positions=512)


# ----------------------------------------------------------------------------- docs


def test_training_docs_match_the_checkpointer_and_resume_rules() -> None:
    text = (REPO / "docs" / "training.md").read_text()
    assert "Saves are asynchronous" in text and "Saves are synchronous" not in text
    resume = text.split("## Resuming and checkpoint safety")[1].split("\n## ")[0]
    for key in runner.RESUMABLE_CHANGES:
        assert f"`{key.rstrip('.')}" in resume, key
    assert "run.seed" in resume
