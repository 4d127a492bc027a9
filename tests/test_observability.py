"""Watching runs: TensorBoard event files beside metrics.jsonl (same values, also across a
resume), on the embedded real PTB-XL sample."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorboardX

from experiments.configs import teacher as teacher_config
from helpers import TINY_NET_FLAGS, read_events, tiny
from mvkt import run_dir, train


def _jsonl_as_tags(workdir) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for row in run_dir.metric_rows(workdir):
        for key, value in row.items():
            if key not in ("step", "epoch") and value is not None:
                out.setdefault(run_dir.tensorboard_tag(key), []).append((row["step"], value))
    return out


def _assert_same(events, jsonl):
    assert events.keys() == jsonl.keys()
    for tag in jsonl:
        assert [s for s, _ in events[tag]] == [s for s, _ in jsonl[tag]], tag
        np.testing.assert_allclose([v for _, v in events[tag]], [v for _, v in jsonl[tag]], rtol=1e-6, err_msg=tag)


@pytest.fixture(scope="module")
def config(ptbxl_sample_shards):
    return lambda **kw: tiny(teacher_config.get_config(), ptbxl_sample_shards, **{"train.epochs": 3, **kw})


def test_event_files_hold_the_values_of_metrics_jsonl(config, tmp_path):
    train.train_and_evaluate(config(), tmp_path, progress=False)
    events = read_events(tmp_path)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/samples_per_s",
            "val/macro_auc"} <= set(events)
    assert any(tag.startswith("val/auc/") for tag in events)   # per class
    _assert_same(events, _jsonl_as_tags(tmp_path))


def test_logging_to_tensorboard_does_not_import_torch(tmp_path):
    """tensorboardX imports torch when it is installed (1.2-1.9 s per run): a torch whose
    import fails loudly stands in for an installed one (CI has none)."""
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('torch was imported')\n")
    code = f"""
import sys
from mvkt import run_dir
log = run_dir.MetricsLog({str(tmp_path / 'run')!r}, resume_step=0, enabled=True)
log.write({{"step": 1, "epoch": 0.5, "loss": 0.25}})
log.close()
assert "torch" not in sys.modules
try:
    import torch
except RuntimeError as e:
    print("afterwards:", e)
"""
    (tmp_path / "run").mkdir()
    repo = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(repo)]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "afterwards: torch was imported" in out.stdout  # torch is importable again afterwards
    assert read_events(tmp_path / "run") == {"train/loss": [(1, 0.25)]}


def test_a_resumed_run_continues_the_same_curves_without_duplicated_steps(config, tmp_path):
    train.train_and_evaluate(config(**{"train.stop_at_step": 3}), tmp_path, progress=False)
    # A crash after a log point past the checkpoint: row and event of step 4 were written,
    # the checkpoint is at 3. The resume must drop both, then log step 4 again, once.
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 4, "epoch": 2.0, "loss": 123.0}) + "\n")
    stale = tensorboardX.SummaryWriter(str(tmp_path / "tensorboard"))
    stale.add_scalar("train/loss", 123.0, 4)
    stale.close()
    train.train_and_evaluate(config(), tmp_path, progress=False)
    events = read_events(tmp_path)
    steps = [s for s, _ in events["train/loss"]]
    assert steps == sorted(set(steps)) == list(range(1, 7))
    assert 123.0 not in [v for _, v in events["train/loss"]]
    _assert_same(events, _jsonl_as_tags(tmp_path))


def _train_cli(workdir, shards, *extra):
    import os
    import pathlib
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, "-m", "experiments.train", "--config=experiments/configs/teacher.py", f"--workdir={workdir}",
         f"--config.data.dir={shards}", *TINY_NET_FLAGS,
         "--config.train.batch_size=32",
         "--config.train.epochs=1", "--config.eval.batch_size=64", "--config.train.log_every_steps=1", *extra],
        cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo)), capture_output=True, text=True, timeout=600)


def test_train_cli_echoes_what_it_runs_and_verbosity_lowers_it(ptbxl_sample_shards, tmp_path):
    result = _train_cli(tmp_path / "run", ptbxl_sample_shards)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    echo = next(line for line in out.splitlines() if "config (fields that differ from the defaults)" in line)
    assert "student.width_mult=0.25" in echo and "train.epochs=1" in echo and "clt.dim" not in echo
    assert "devices: 1 x cpu" in out or "devices:" in out
    assert f"run folder {tmp_path / 'run'}" in out and "67 training and 16 validation records" in out
    assert "Given directory is read only" not in out and "read_only=True" not in out
    # The acceptance interface: event files under the run folder with the loss and validation AUC.
    assert {"train/loss", "val/macro_auc"} <= set(read_events(tmp_path / "run"))

    quiet = _train_cli(tmp_path / "quiet", ptbxl_sample_shards, "--verbosity=-1")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "config (fields" not in quiet.stderr + quiet.stdout and "run folder" not in quiet.stdout
