"""mvkt.memory: the heap that a compilation freed goes back to the OS."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import pytest

from benchmarks import harness
from mvkt import memory


def _rss_anon_mb() -> float:
    return harness.status_kb("RssAnon") / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc: Linux only")
def test_release_freed_memory_returns_a_freed_heap_hole_to_the_os():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    chunk, count = 64 * 1024, 1600  # 100 MB in chunks below glibc's mmap threshold: on the heap
    blocks = [libc.malloc(chunk) for _ in range(count)]
    pin = libc.malloc(chunk)  # keeps the freed blocks a hole inside the heap, which free() leaves mapped
    for b in blocks:
        ctypes.memset(b, 1, chunk)
    for b in blocks:
        libc.free(b)
    held = _rss_anon_mb()
    assert memory.release_freed_memory() is True
    released = held - _rss_anon_mb()
    libc.free(pin)
    assert released > 50, f"malloc_trim gave back {released:.0f} MB of a 100 MB hole"


def test_release_after_first_releases_once_per_name(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: calls.append(1) or True)
    release = memory.ReleaseAfterFirst()
    for what in ("step", "step", "validation", "step", "validation"):
        release(what)
    assert len(calls) == 2


def test_training_releases_the_heap_after_its_first_steps_and_first_validation_only(
        ptbxl_sample_shards, tmp_path, monkeypatch):
    from experiments.configs import teacher as teacher_config
    from helpers import tiny
    from mvkt import train

    calls = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: calls.append(1) or True)
    # 2 epochs of 2 steps, logged at every step, validated at both epoch ends: 4 log points, 2 validations.
    train.train_and_evaluate(tiny(teacher_config.get_config(), ptbxl_sample_shards), tmp_path / "run", progress=False)
    assert len(calls) == 2
