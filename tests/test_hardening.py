"""Damaged checkpoints, one writer per run folder, unfinished runs, lost logs and I/O errors,
on real runs of the embedded PTB-XL sample (tiny configs)."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import resource
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from experiments.configs import student as student_config
from experiments.configs import teacher as teacher_config
from mvkt import checkpoints as ckpt_lib
from mvkt import evaluate as evaluate_lib
from mvkt import run_dir, train

import helpers
from helpers import TINY_NET_FLAGS, read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 300


def tiny(config, shards, **overrides):
    """The shared tiny config with 3 epochs (6 steps): room for a checkpoint between the others."""
    return helpers.tiny(config, shards, **{"train.epochs": 3, **overrides})


def assert_same_rows(a, b):
    ra, rb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_allclose(y[k], x[k], rtol=1e-6, err_msg=f"step {x['step']} {k}")


def cli(*args, timeout=CLI_TIMEOUT_S, **popen):
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )


def train_args(workdir, shards, *extra):
    return [
        "experiments.train",
        "--config=experiments/configs/teacher.py",
        f"--workdir={workdir}",
        f"--config.data.dir={shards}",
        *TINY_NET_FLAGS,
        "--config.train.batch_size=32",
        "--config.train.epochs=3",
        "--config.eval.batch_size=64",
        *extra,
    ]


def largest_file(folder: pathlib.Path) -> pathlib.Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def damage(step_dir: pathlib.Path, how: str) -> None:
    if how == "truncated":
        path = largest_file(step_dir)
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 3)
    elif how == "deleted":
        largest_file(step_dir / "model").unlink()
    elif how == "bad_metadata":
        (meta,) = [p for p in (step_dir / "meta").iterdir() if p.name != "commit_success.txt"]
        meta.write_text('{"step": 5, "val_macro')
    else:
        raise ValueError(how)


@pytest.fixture(scope="module")
def straight_teacher(ptbxl_sample_shards, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight") / "run"
    train.train_and_evaluate(tiny(teacher_config.get_config(), ptbxl_sample_shards), workdir, progress=False)
    return workdir


@pytest.mark.parametrize("how", ["truncated", "deleted", "bad_metadata"])
def test_a_damaged_latest_checkpoint_falls_back_and_resumes_exactly(
    how, straight_teacher, ptbxl_sample_shards, tmp_path, caplog
):
    workdir = tmp_path / "run"
    config = tiny(teacher_config.get_config(), ptbxl_sample_shards)
    train.train_and_evaluate(tiny(teacher_config.get_config(), ptbxl_sample_shards, **{"train.stop_at_step": 5}),
                             workdir, progress=False)
    assert run_dir.checkpoint_steps(workdir) == [2, 4, 5]
    damage(workdir / "checkpoints" / "5", how)
    with caplog.at_level(logging.WARNING):
        summary = train.train_and_evaluate(config, workdir, progress=False)
    assert summary["finished"]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "checkpoint step 5 does not restore" in warned, warned
    assert [p.name.split("-")[1] for p in (workdir / "damaged_checkpoints").iterdir()] == ["5"]
    assert_same_rows(straight_teacher, workdir)


def test_cli_resumes_past_a_truncated_checkpoint_and_stops_cleanly_when_none_restores(
    ptbxl_sample_shards, tmp_path
):
    workdir = tmp_path / "run"
    result = cli(*train_args(workdir, ptbxl_sample_shards, "--config.train.stop_at_step=4"))
    assert result.returncode == 0, result.stderr[-3000:]
    damage(workdir / "checkpoints" / "4", "truncated")
    result = cli(*train_args(workdir, ptbxl_sample_shards))
    assert result.returncode == 0, result.stderr[-3000:]
    assert run_dir.is_finished(workdir)
    for step in run_dir.checkpoint_steps(workdir):
        damage(workdir / "checkpoints" / str(step), "deleted")
    result = cli(*train_args(workdir, ptbxl_sample_shards))  # a rerun restores before it checks for work
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {workdir / 'checkpoints'}: none of the checkpoints (steps 6, 4, 2)"), last
    assert "Traceback" not in result.stderr


def test_a_damaged_best_checkpoint_is_a_clear_evaluation_error(straight_teacher, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(straight_teacher, workdir)
    (best,) = (workdir / "best").iterdir()
    damage(best, "deleted")
    with pytest.raises(ckpt_lib.CheckpointError, match=r"best: none of the checkpoints \(steps \d+\) restores .* \(--checkpoint=latest\)"):
        evaluate_lib.evaluate_run(workdir, split="test", n_resamples=20)
    result = evaluate_lib.evaluate_run(workdir, split="test", n_resamples=20, which="latest")
    assert result["checkpoint"] == "latest" and result["run_finished"]


def test_two_trainings_started_together_on_one_folder_one_is_refused(ptbxl_sample_shards, tmp_path):
    workdir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen([sys.executable, "-m", *train_args(workdir, ptbxl_sample_shards)], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=CLI_TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], [(p.returncode, err[-2000:]) for p, (_, err) in zip(procs, outputs)]
    refused = next(err for p, (_, err) in zip(procs, outputs) if p.returncode == 1)
    assert "Traceback" not in refused
    assert f"error: {workdir} is being written by pid" in refused, refused
    rows_written = [r["step"] for r in run_dir.metric_rows(workdir) if "loss" in r]
    assert rows_written == sorted(set(rows_written))  # one writer: no duplicated rows
    assert not (workdir / run_dir.LOCK_FILE).exists()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(timeout=60)
    return p.pid


def test_a_lock_of_a_dead_process_is_taken_over_and_a_live_one_refuses(ptbxl_sample_shards, tmp_path, caplog):
    workdir = tmp_path / "run"
    workdir.mkdir()
    lock = workdir / run_dir.LOCK_FILE
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "since": "earlier"}))
    config = tiny(teacher_config.get_config(), ptbxl_sample_shards, **{"train.epochs": 1})
    with caplog.at_level(logging.WARNING):
        train.train_and_evaluate(config, workdir, progress=False)
    assert "taking over the lock of a process that no longer runs" in caplog.text
    assert not lock.exists()

    held = run_dir.RunLock(workdir)
    held.acquire()
    try:
        with pytest.raises(run_dir.RunLockedError, match=rf"being written by pid {os.getpid()} on {socket.gethostname()}"):
            evaluate_lib.evaluate_run(workdir, split="test", n_resamples=20)
    finally:
        held.release()
    other_host = {"host": "another-host", "pid": 1, "since": "earlier", "command": "train"}
    lock.write_text(json.dumps(other_host))
    with pytest.raises(run_dir.RunLockedError, match=r"on another-host .* delete .*\.lock"):
        train.train_and_evaluate(config, workdir, progress=False)


def test_unfinished_teacher_is_refused_unless_allowed_and_unfinished_evaluation_is_marked(
    ptbxl_sample_shards, tmp_path, caplog
):
    teacher = tmp_path / "teacher"
    train.train_and_evaluate(tiny(teacher_config.get_config(), ptbxl_sample_shards, **{"train.stop_at_step": 2}),
                             teacher, progress=False)
    student = tiny(student_config.get_config(), ptbxl_sample_shards, **{"teacher.runs": (str(teacher),)},
                   **{"train.epochs": 1})
    with pytest.raises(ValueError, match=r"stopped at step 2/6: finish it .* --config.teacher.allow_unfinished=true"):
        train.train_and_evaluate(student, tmp_path / "student", progress=False)
    student.teacher.allow_unfinished = True
    with caplog.at_level(logging.WARNING):
        assert train.train_and_evaluate(student, tmp_path / "student", progress=False)["finished"]
    assert "distilling from it anyway" in caplog.text

    result = evaluate_lib.evaluate_run(teacher, split="test", n_resamples=20)
    assert (result["run_finished"], result["trained_steps"], result["total_steps"]) == (False, 2, 6)
    assert json.loads((teacher / "eval_test.json").read_text())["run_finished"] is False
    assert "WARNING: unfinished run (2 of 6 steps trained)" in evaluate_lib.format_table(result)


@pytest.mark.parametrize("loss", ["deleted", "shortened"])
def test_resuming_without_the_metrics_log_warns(loss, ptbxl_sample_shards, tmp_path, caplog):
    workdir = tmp_path / "run"
    config = tiny(teacher_config.get_config(), ptbxl_sample_shards, **{"train.epochs": 2})
    train.train_and_evaluate(tiny(teacher_config.get_config(), ptbxl_sample_shards,
                                  **{"train.epochs": 2, "train.stop_at_step": 3}), workdir, progress=False)
    log = workdir / run_dir.METRICS_FILE
    if loss == "deleted":
        log.unlink()
        expected = "is missing: the run resumes at step 3, the rows of steps 1-3 are lost"
    else:
        log.write_text(log.read_text().splitlines()[0] + "\n")  # step 1 only
        expected = "ends at step 1 but the run resumes at step 3: the rows of steps 2-3 are lost"
    with caplog.at_level(logging.WARNING):
        train.train_and_evaluate(config, workdir, progress=False)
    assert expected in caplog.text


def test_output_that_cannot_be_written_ends_with_one_line(ptbxl_sample_shards, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = cli(*train_args(blocker / "run", ptbxl_sample_shards))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {blocker / 'run'}: Not a directory"

    def small_files():  # as a full disk: writes past 64 KiB fail (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    # No XLA cache: its entries would hit the limit too.
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    workdir = tmp_path / "full"
    result = subprocess.run(
        [sys.executable, "-m", *train_args(workdir, ptbxl_sample_shards, "--config.train.epochs=1")],
        cwd=REPO, env=dict(env, PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=CLI_TIMEOUT_S, preexec_fn=small_files,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {workdir / 'checkpoints'}: checkpoint step 2 could not be written (file too large); "
                      "the partial checkpoint was removed. Free space and rerun the same command: training continues "
                      "from the last complete checkpoint"], result.stderr[-3000:]
    assert not list(workdir.rglob("*.orbax-checkpoint-tmp*"))


def test_stale_data_prep_work_folders_are_removed(samples_dir, tmp_path):
    from data_prep import ptbxl

    out = tmp_path / "shards"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        dead = tmp_path / f".shards.tmp-{socket.gethostname()}-{_dead_pid()}"
        legacy = tmp_path / f".shards.tmp-{_dead_pid()}"
        live = tmp_path / f".shards.tmp-{socket.gethostname()}-{sleeper.pid}"
        elsewhere = tmp_path / ".shards.tmp-another-host-1"
        for folder in (dead, legacy, live, elsewhere):
            (folder / "_scratch").mkdir(parents=True)
            (folder / "_scratch" / "part-000000.f32").write_bytes(b"\0" * 1024)
        ptbxl.prepare(samples_dir / "ptbxl", out, task="superdiagnostic")
        assert not dead.exists() and not legacy.exists()
        assert live.exists() and elsewhere.exists()
        assert (out / "manifest.json").exists()
        assert not list(tmp_path.glob(f".shards.tmp-{socket.gethostname()}-{os.getpid()}"))
    finally:
        sleeper.kill()
        sleeper.wait(timeout=60)
