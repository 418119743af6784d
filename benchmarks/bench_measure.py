"""Framework-free measurement helpers for the benchmark cells: host peak RSS, round timing.

A cell is one (implementation, shape, K) measurement, normally run in its own process so its
peak memory is its own. The peak is taken over the *steady* rounds only: the kernel's high-water
mark (VmHWM) is reset after set-up and the first round, so weight generation and compilation do
not count (``reset_peak_rss``; ru_maxrss, which cannot be reset, is the fallback).
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any


def _status_kb(field: str) -> int | None:
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux ≥ 4.0); False when unsupported."""
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """High-water RSS since the last ``reset_peak_rss`` (else since process start)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024


def rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    return 0 if kb is None else kb * 1024


def pin_threads(threads: int | None) -> None:
    """Restrict this process to its first ``threads`` allowed CPUs (XLA sizes its thread pool from
    the affinity mask; torch is also told explicitly). On a shared machine this keeps either side
    from spinning on barriers while another job holds a core."""
    if not threads:
        return
    allowed = sorted(os.sched_getaffinity(0))
    if threads > len(allowed):
        raise ValueError(
            f"--threads={threads} exceeds the {len(allowed)} CPUs this process may use"
        )
    os.sched_setaffinity(0, allowed[:threads])


def time_rounds(
    run_round: Callable[[], None], rounds: int, after_first: Callable[[], None] | None = None
) -> dict[str, float]:
    """Run 1 + ``rounds`` rounds; ``run_round`` must block until the round's results exist.

    Returns first (s, includes compilation / warm-up), round (median of the rest), all rounds.
    ``after_first`` runs between the first and the timed rounds (e.g. resetting the peak).
    """
    t0 = time.perf_counter()
    run_round()
    first = time.perf_counter() - t0
    if after_first is not None:
        after_first()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run_round()
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "round_s": statistics.median(times), "rounds_s": times}


def read_json(path: str | pathlib.Path) -> dict[str, Any]:
    return json.loads(pathlib.Path(path).read_text())


def write_json(path: str | pathlib.Path, obj: Any) -> None:
    pathlib.Path(path).write_text(json.dumps(obj, indent=1) + "\n")
