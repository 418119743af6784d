"""Run a test worker in a fresh interpreter with N fake CPU devices.

JAX fixes its device count when it first initialises, and the pytest process has usually done so
with one CPU device; so tests that need a mesh call ``run_worker("test_x", "_worker", ...)``,
which imports ``tests/test_x.py`` in a new ``python`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` and calls ``_worker(*args)``. The worker
asserts what it checks and returns a JSON-serialisable value, handed back to the test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
_MARK = "__worker_result__="


def worker_env(devices: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]),
        **extra,
    )
    return env


def worker_command(module: str, func: str, *args: Any) -> list[str]:
    code = (
        f"import json, sys, {module} as m; "
        f"r = m.{func}(*json.loads(sys.argv[1])); print({_MARK!r} + json.dumps(r))"
    )
    return [sys.executable, "-c", code, json.dumps(args)]


def result_of(out: str) -> Any:
    line = next(x for x in reversed(out.splitlines()) if x.startswith(_MARK))
    return json.loads(line[len(_MARK) :])


def run_worker(module: str, func: str, *args: Any, devices: int = 8, timeout: float = 600) -> Any:
    """``module.func(*args)`` in a subprocess with ``devices`` fake CPU devices; its result."""
    proc = subprocess.run(
        worker_command(module, func, *args),
        env=worker_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"worker {module}.{func} failed:\n{proc.stderr[-6000:]}"
    return result_of(proc.stdout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the coordinator's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(
    commands: Sequence[list[str]],
    env: dict[str, str],
    timeout: float,
    cwds: Sequence[str | None] | None = None,
) -> list[subprocess.CompletedProcess]:
    """Start every command at once (the processes of one multi-process run; each in its
    working directory ``cwds[i]``, default this one) and wait for all; on a timeout all are
    killed and the timeout raised."""
    cwds = cwds or [None] * len(commands)
    procs = [
        subprocess.Popen(
            c, env=env, cwd=d, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for c, d in zip(commands, cwds, strict=True)
    ]
    done = []
    try:
        for c, p in zip(commands, procs, strict=True):
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(c, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done
