"""Returning the heap memory that compilation freed to the operating system.

XLA's compiler allocates hundreds of MB while it compiles a train step and frees them, but
glibc's allocator keeps freed heap pages mapped, so the process stays that much larger for
the whole run (measured on CPU, batch 128: xresnet1d50 teacher's peak during steps 1,104 MB
without, 640 MB with ``malloc_trim`` after the first steps; benchmarks/memory.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None; looked up once (``find_library`` runs ``ldconfig``)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """``malloc_trim(0)`` where the C library has it (glibc); False elsewhere."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class ReleaseAfterFirst:
    """Calls ``release_freed_memory`` the first time each named thing happens (the first step,
    the first validation: the calls that compile), and never again."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, what: str) -> None:
        if what not in self._seen:
            self._seen.add(what)
            release_freed_memory()
