"""The skip guard in conftest.py: a run with a skip for any reason but missing hardware fails."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

CONFTEST = pathlib.Path(__file__).resolve().parent / "conftest.py"


def _run(tmp_path: pathlib.Path, body: str) -> subprocess.CompletedProcess:
    """pytest in a subprocess on one small test file beside a copy of our conftest."""
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text("import pytest\n\n" + body)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_passing_run_passes(tmp_path):
    assert _run(tmp_path, "def test_ok():\n    pass\n").returncode == 0


@pytest.mark.parametrize(
    "body",
    [
        "def test_a():\n    pytest.skip('data not found')\n",
        "@pytest.mark.skip(reason='flaky')\ndef test_a():\n    pass\n",
        "@pytest.mark.skipif(True, reason='no GPU')\ndef test_a():\n    pass\n",  # no prefix
        "pytest.importorskip('no_such_module_xyz')\n\ndef test_a():\n    pass\n",  # module level
        "@pytest.fixture\ndef f():\n    pytest.skip('in a fixture')\n\ndef test_a(f):\n    pass\n",
    ],
    ids=["call", "mark", "skipif-without-prefix", "module-importorskip", "fixture"],
)
def test_a_skip_for_another_reason_fails_the_run(tmp_path, body):
    proc = _run(tmp_path, body + "\ndef test_b():\n    pass\n")
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED, proc.stdout[-2000:]
    assert "skips not allowed" in proc.stdout
    assert "test_sample.py" in proc.stdout.split("skips not allowed")[1]


def test_a_hardware_skip_keeps_the_run_green(tmp_path):
    body = (
        "def test_a():\n    pytest.skip('needs hardware: 2 hosts')\n\n"
        "@pytest.mark.skipif(True, reason='needs hardware: a GPU')\n"
        "def test_b():\n    pass\n\n"
        "@pytest.mark.xfail(reason='known bug', strict=True)\n"  # runs; not a skip
        "def test_c():\n    assert 0\n\n"
        "def test_d():\n    pass\n"
    )
    proc = _run(tmp_path, body)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "2 skipped" in proc.stdout and "skips not allowed" not in proc.stdout
