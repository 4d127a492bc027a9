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
