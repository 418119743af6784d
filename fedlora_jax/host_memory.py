"""Return the heap that compilation freed to the operating system (glibc ``malloc_trim``).

XLA compiles on the calling thread, whose malloc arena then holds the compiler's freed memory,
while the compiled program runs on XLA's thread pool, whose threads allocate from their own
arenas: the freed compiler heap is never reused and stays in the process's resident set. On the
SmolLM2-135M round of ``benchmarks/federated_round.py`` (K = 8, remat) that is about 450 MiB of a
2 GiB peak. Callers release once after each new compilation (``compiles`` says when a program
meets new shapes), not after every call; elsewhere (not glibc) it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable, Hashable


@functools.cache
def _malloc_trim() -> Callable[[ctypes.c_size_t], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to release
        return None


def release_free_heap() -> bool:
    """Give freed heap pages back to the OS; True when the C library could (glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(ctypes.c_size_t(0))
    return True


_SEEN: set[Hashable] = set()


def compiles(program: Hashable) -> bool:
    """True the first time ``program`` (a jitted function's identity and its argument shapes)
    runs in this process: jit compiles it then, and only then is there a heap to release."""
    new = program not in _SEEN
    _SEEN.add(program)
    return new
