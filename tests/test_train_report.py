"""Run-dir artifacts without a model: metrics logger (JSONL, TensorBoard, round line), results.md
and the cross-run comparison, checked against hand-computed values."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from fedlora_jax.eval.report import ExampleScore, build_report
from fedlora_jax.logging import MetricsLogger, flatten, read_metrics, round_line
from fedlora_jax.report import compare, write_results


def _tb_scalars(run_dir: pathlib.Path) -> dict[tuple[str, int], float]:
    """Every scalar in the run's TensorBoard event files, parsed from the TFRecord framing."""
    out = {}
    for path in sorted((run_dir / "tb").glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out[(v.tag, event.step)] = v.simple_value
    return out


def test_flatten_keeps_numbers_only() -> None:
    nested = {"a": {"b": 1.5, "c": {"d": 2}}, "e": None, "f": "x", "g": True}
    assert flatten(nested) == {"a/b": 1.5, "a/c/d": 2}
    assert flatten({"x": 1.0}, "global") == {"global/x": 1.0}


def test_round_line_has_loss_metrics_and_bytes() -> None:
    line = round_line(
        2, 5,
        {"train/loss": 1.23456, "global/rouge_l": 0.25, "personal/rouge_l/mean": 0.3,
         "personal/rouge_l/worst": 0.1, "comm/up_bytes": 2_500_000, "comm/down_bytes": 5_000_000,
         "time/round_s": 3.21},
    )  # fmt: skip
    assert line == (
        "round 2/5 | train loss 1.2346 | global rouge_l 0.2500 | "
        "personal rouge_l mean 0.3000 rouge_l worst 0.1000 | up 2.50 MB down 5.00 MB | 3.2 s"
    )


def test_logger_writes_jsonl_and_tensorboard_and_resumes(tmp_path: pathlib.Path) -> None:
    lines: list[str] = []
    with MetricsLogger(tmp_path, rounds=3, progress=False, echo=lines.append) as log:
        for r in (1, 2, 3):
            log.log(r, {"train/loss": 3.0 - r, "global/rouge_l": 0.1 * r})
    assert [row["round"] for row in read_metrics(tmp_path)] == [1, 2, 3]
    assert len(lines) == 3 and lines[0].startswith("round 1/3 | train loss 2.0000")
    scalars = _tb_scalars(tmp_path)
    assert scalars[("train/loss", 2)] == pytest.approx(1.0)
    assert scalars[("global/rouge_l", 3)] == pytest.approx(0.3)
    # a run resumed from its round-1 checkpoint repeats rounds 2 and 3: their rows are replaced
    resumed = MetricsLogger(tmp_path, rounds=3, resume_round=1, progress=False, echo=lines.append)
    with resumed as log:
        log.log(2, {"train/loss": 7.0})
    rows = read_metrics(tmp_path)
    assert rows == [{"round": 1, "train/loss": 2.0, "global/rouge_l": 0.1},
                    {"round": 2, "train/loss": 7.0}]  # fmt: skip


def _report(client_rouge: dict[int, list[float]], nll: float) -> dict:
    scores = [
        ExampleScore(cid, "qa", r, 0.0, nll * 4, 4) for cid, rs in client_rouge.items() for r in rs
    ]
    return build_report(scores, scores)


def _fake_run(
    root: pathlib.Path, name: str, algorithm: str, seed: int, final: dict
) -> pathlib.Path:
    run = root / name
    run.mkdir()
    cfg = {
        "model": {"spec": "stories260k"},
        "algorithm": {"name": algorithm, "options": {}},
        "adapter": {"kind": "lora", "r": 4, "alpha": 8.0, "targets": "qv"},
        "data": {"source": "dolly", "partition": "dirichlet", "num_clients": 2},
        "federated": {"rounds": 2, "local_steps": 3},
        "run": {"seed": seed},
    }
    (run / "config.json").write_text(json.dumps(cfg))
    # the client x category table a run writes; compare counts the clients from it (budget)
    (run / "clients.csv").write_text("client,open_qa,summarization\nclient_0,5,1\nclient_1,4,0\n")
    up = "comm/up_bytes_per_client"
    rows = [
        {"round": 1, "train/loss": 2.0 + seed, "global/rouge_l": 0.1, up: 10},
        {"round": 2, "train/loss": 1.0 + seed, "global/rouge_l": 0.2, up: 10},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "final_eval.json").write_text(json.dumps(final))
    return run


def test_results_md_and_plot(tmp_path: pathlib.Path) -> None:
    run = _fake_run(tmp_path, "r", "fedit", 0, _report({0: [0.5, 0.3], 1: [0.1]}, 2.0))
    text = write_results(run).read_text()
    assert "| algorithm | fedit |" in text
    # global ROUGE-L = mean over the 3 examples = 0.3; worst client = client 1 (0.1)
    assert "| global | 0.3000 | 0.0000 | 2.0000 |" in text
    assert "| round | train loss | global ROUGE-L | up bytes/client |" in text
    assert "| 2 | 1.0000 | 0.2000 | 10 |" in text
    png = run / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_gives_mean_and_std_over_seeds(tmp_path: pathlib.Path) -> None:
    runs = [
        _fake_run(tmp_path, "a0", "fedit", 0, _report({0: [0.2], 1: [0.4]}, 1.0)),
        _fake_run(tmp_path, "a1", "fedit", 1, _report({0: [0.6], 1: [0.4]}, 3.0)),
        _fake_run(tmp_path, "b0", "fedsa_lora", 0, _report({0: [0.9], 1: [0.1]}, 2.0)),
    ]
    text = compare(runs, tmp_path / "cmp").read_text()
    # fedit global ROUGE-L per seed: 0.3 and 0.5 -> 0.4 ± 0.1; loss 1 and 3 -> 2 ± 1
    g = np.array([0.3, 0.5])
    assert f"| fedit | 2 | {g.mean():.4f} ± {g.std():.4f} | 2.0000 ± 1.0000 |" in text
    # local worst: seed 0 min(0.2, 0.4) = 0.2, seed 1 min(0.6, 0.4) = 0.4 -> 0.3 ± 0.1
    assert "0.3000 ± 0.1000" in text
    assert "| fedsa_lora | 1 | 0.5000 ± 0.0000 |" in text
    assert (tmp_path / "cmp" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="--group_by='run.nope' is not a key"):
        compare(runs, tmp_path / "cmp", group_by="run.nope")
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        compare([tmp_path / "cmp"], tmp_path / "cmp2")


def _script_main(name: str):
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_compare_script(tmp_path: pathlib.Path, capsys) -> None:
    runs = [
        _fake_run(tmp_path, "a0", "fedit", 0, _report({0: [0.2]}, 1.0)),
        _fake_run(tmp_path, "a1", "fedit", 1, _report({0: [0.4]}, 1.0)),
    ]
    main = _script_main("compare")
    assert main([*map(str, runs), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr()
    assert "| fedit | 2 | 0.3000 ± 0.1000 |" in printed.out
    # the fake runs' final_eval.json records no evaluation rows: compared by config, said once
    assert printed.err.startswith(f"warning: {runs[0]}, {runs[1]}: final_eval.json records no")
    assert printed.err.count("\n") == 1
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "cmp")]) == 2
    assert "error: " in capsys.readouterr().err


def test_evaluate_script_errors_are_one_line(tmp_path: pathlib.Path, capsys) -> None:
    main = _script_main("evaluate")
    assert main(["--run_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not a run directory" in err and "\n" not in err
