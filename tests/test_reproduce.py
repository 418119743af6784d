"""scripts/reproduce.py: budgets checked before training, cell-by-cell resume on the stories260K
grid (configs/protocol.py:tiny), the report and its raw JSON."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from fedlora_jax.protocol import BudgetMismatch, Method

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "reproduce.py"
TINY = f"{REPO / 'configs' / 'protocol.py'}:tiny"


def _module():
    spec = importlib.util.spec_from_file_location("reproduce_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_grid_of_unequal_budgets_is_refused(tmp_path) -> None:
    reproduce = _module()
    grid = reproduce.load_grid(TINY)
    unmatched = Method("fedlora_optimizer", ("algorithm.name=fedlora_optimizer",), (1e-3,))
    grid = dataclasses.replace(grid, methods=(grid.methods[0], unmatched))
    with pytest.raises(BudgetMismatch, match="dolly-dir0.5/fedlora_optimizer: .*global 2 \\+ "):
        reproduce.check_grid_budgets(grid, tmp_path)


def test_a_missing_or_broken_grid_file_is_one_line(tmp_path, capsys) -> None:
    """The grid file goes through the config loader: the same one-line errors as --config."""
    reproduce = _module()
    missing = tmp_path / "absent.py"
    args = ["--out", str(tmp_path / "runs"), "--report", str(tmp_path / "r.md")]
    assert reproduce.main(["--grid", f"{missing}:tiny", *args]) == 2
    assert capsys.readouterr().err == f"error: --grid: file '{missing}' not found\n"
    broken = tmp_path / "broken.py"
    broken.write_text("def get_grid(preset):\n    return 1 / 0\n")
    assert reproduce.main(["--grid", f"{broken}:tiny", *args]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {broken}:2: ZeroDivisionError: division by zero\n"
    nogrid = tmp_path / "nogrid.py"
    nogrid.write_text("X = 1\n")
    assert reproduce.main(["--grid", str(nogrid), *args]) == 2
    assert capsys.readouterr().err == f"error: {nogrid}: defines no get_grid(preset)\n"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "r.md").exists()


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--grid", TINY, *args],
        capture_output=True, text=True, env=env, timeout=900, cwd=REPO,
    )  # fmt: skip


def test_reproduce_resumes_cell_by_cell(tmp_path) -> None:
    out, report = tmp_path / "runs", tmp_path / "docs" / "reproduction.md"
    common = ("--out", str(out), "--report", str(report))
    first = _run(*common, "--max_cells", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    done = sorted(out.glob("*/*/*/cell.json"))
    assert len(done) == 2 and "ran 2 cells" in first.stdout
    stamps = {p: (p.stat().st_mtime_ns, (p.parent / "final_eval.json").stat().st_mtime_ns)
              for p in done}  # fmt: skip

    second = _run(*common)
    assert second.returncode == 0, second.stderr[-3000:]
    # tiny: 2 methods x (2 lrs on seed 0 + the chosen lr on seed 1) = 6 cells; 2 were done
    assert "ran 4 cells" in second.stdout and second.stdout.count("[skip]") == 2
    assert all(
        (p.stat().st_mtime_ns, (p.parent / "final_eval.json").stat().st_mtime_ns) == stamps[p]
        for p in done
    )
    assert len(list(out.glob("*/*/*/cell.json"))) == 6

    third = _run(*common)
    assert "ran 0 cells" in third.stdout and third.stdout.count("[skip]") == 6

    raw = json.loads(report.with_suffix(".json").read_text())
    assert len(raw["cells"]) == 6
    cell = raw["cells"]["dolly-dir0.5/fedit/lr0.001-seed0"]
    assert cell["budget"]["steps_per_round"] == 4 and cell["budget"]["rows_per_round"] == 8
    for split in ("test", "val"):
        assert cell[split]["personal_loss"] > 0 and cell[split]["global_loss"] > 0
    # The validation split is not the test split: the two losses of a cell differ.
    assert cell["val"]["personal_loss"] != cell["test"]["personal_loss"]
    flo = raw["results"]["dolly-dir0.5"]["fedlora_optimizer"]
    assert flo["lr"] in (0.001, 0.003) and sorted(flo["seeds"]) == ["0", "1"]
    text = report.read_text()
    assert "| FedLoRA-Optimizer ≥ FedIT globally | dolly-dir0.5 |" in text
    assert "see the sensitivity study" in text
    for png in ("reproduction_loss.png", "reproduction_diffs.png"):
        assert (report.parent / png).read_bytes()[:4] == b"\x89PNG"

    # Every cell records the rows it was scored on: 2 clients x the first 2 test rows (the
    # grid's eval.max_examples_per_client), no global test split; one digest per seed, since
    # each seed is its own data preparation (data.seed) and every method of a seed shares it.
    rows = {
        p.parent.relative_to(out): json.loads(p.read_text())["eval_rows"]
        for p in out.glob("*/*/*/final_eval.json")
    }
    assert len(rows) == 6
    assert all(r["clients"] == [2, 2] and r["global_test"] is None for r in rows.values())
    by_seed = {s: {r["sha256"] for c, r in rows.items() if c.name.endswith(s)} for s in "01"}
    assert len(by_seed["0"]) == 1 and len(by_seed["1"]) == 1 and by_seed["0"] != by_seed["1"]
    sys.path.insert(0, str(REPO / "scripts"))
    import compare

    cells = [str(p.parent) for p in sorted(out.glob("*/*/*-seed1/final_eval.json"))]
    assert compare.main([*cells, "--out", str(tmp_path / "cmp")]) == 0
