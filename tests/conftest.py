"""Shared pytest fixtures: the in-project real data samples and shards prepared from them."""

from __future__ import annotations

import os
import pathlib
import tempfile

import pytest

# Identical XLA programs (the same tiny net in several tests, and in the CLI
# subprocesses, which inherit the environment) compile once per test session.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "mvkt-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Hashes of verified shards (mvkt.data.verify_shards) stay out of the user's cache.
os.environ.setdefault("MVKT_CACHE_DIR", tempfile.mkdtemp(prefix="mvkt-test-cache-"))

MAX_WORKERS = 4


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per core, at most MAX_WORKERS. The suite is CPU-bound (XLA
    compiles one program on one core); more workers than cores only slow each other, and the
    multi-process tests start 2-3 processes of their own under a hard deadline."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


SAMPLES_DIR = pathlib.Path(__file__).resolve().parents[1] / "data_prep" / "samples"


@pytest.fixture(scope="session")
def samples_dir() -> pathlib.Path:
    """data_prep/samples: ptbxl/ (100 PTB-XL records), cpsc2018/ (6 records + REFERENCE.csv), cinc/."""
    return SAMPLES_DIR


@pytest.fixture(scope="session")
def ptbxl_sample_shards(tmp_path_factory) -> pathlib.Path:
    """The embedded PTB-XL sample prepared once (superdiagnostic, 100 Hz, float32): the out dir.

    95 labelled records: train 67 (folds 1-8), val 16 (fold 9), test 12 (fold 10). Treat as read-only.
    """
    from data_prep import ptbxl

    out = tmp_path_factory.mktemp("ptbxl_sample") / "superdiagnostic_100hz"
    ptbxl.prepare(SAMPLES_DIR / "ptbxl", out, task="superdiagnostic", sampling_rate=100)
    return out


@pytest.fixture(scope="session")
def tiny_teacher(ptbxl_sample_shards, tmp_path_factory) -> pathlib.Path:
    """A finished 12-lead teacher of ``helpers.tiny`` (2 epochs, 4 steps, checkpoints 2 and 4)
    on the PTB-XL sample, trained once per test worker: the teacher of most distillation
    tests. Treat as read-only; a test that changes it works on a copy (shutil.copytree)."""
    from experiments.configs import teacher as teacher_config
    from helpers import tiny
    from mvkt import train

    workdir = tmp_path_factory.mktemp("tiny_teacher") / "run"
    train.train_and_evaluate(tiny(teacher_config.get_config(), ptbxl_sample_shards), workdir, progress=False)
    return workdir
