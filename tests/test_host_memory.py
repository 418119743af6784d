"""``host_memory.release_free_heap`` hands freed heap pages back to the OS (glibc)."""

from __future__ import annotations

import ctypes
import ctypes.util
import pathlib

from fedlora_jax.host_memory import release_free_heap

MiB = 2**20


def rss_mib() -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_freed_heap_leaves_the_resident_set():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    chunk = 32 * 1024  # below glibc's mmap threshold: these live in the heap
    blocks = [libc.malloc(chunk) for _ in range(256 * MiB // chunk)]
    for b in blocks:
        ctypes.memset(b, 1, chunk)  # make every page resident
    for b in blocks[:-1]:  # the last block pins the heap's top: free() cannot shrink it
        libc.free(b)
    before = rss_mib()
    assert release_free_heap()
    after = rss_mib()
    libc.free(blocks[-1])
    assert before - after > 128, (before, after)  # ~256 MiB freed in the middle of the heap
