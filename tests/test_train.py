"""Training core on the embedded real PTB-XL sample: loss goes down, exact resume,
NaN guard, teacher cache, frozen teacher, config overrides and the CLI contract."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments.configs import student as student_config
from experiments.configs import teacher as teacher_config
from mvkt import step as step_lib
from mvkt import run_config
from mvkt import teachers
from mvkt import data as data_lib
from mvkt import input_pipeline
from mvkt import parallel as parallel_lib
from mvkt import run_dir
from mvkt import train

from helpers import TINY_NET_FLAGS, read_metrics, tiny

REPO = pathlib.Path(__file__).resolve().parents[1]


def lead_i_student_step(config, split, *, teacher_model, teacher_vars, parallel):
    """A fresh lead-I student state with CLT heads and its jitted (undonated) train step."""
    training = step_lib.build_training(
        config,
        num_classes=split.num_classes,
        crop_length=250,
        total_steps=10,
        parallel=parallel,
        rng=jax.random.PRNGKey(0),
        train_labels=split.y,
        teacher=(teacher_model, teacher_vars),
        donate=False,
    )
    return training.state, training.update


@pytest.fixture(scope="module")
def teacher_run(tiny_teacher, tmp_path_factory):
    """This module's copy of the session's teacher: the rerun tests below take its lock."""
    workdir = tmp_path_factory.mktemp("teacher") / "run"
    shutil.copytree(tiny_teacher, workdir)
    return workdir


def test_teacher_run_writes_metrics_and_checkpoints(teacher_run):
    rows = read_metrics(teacher_run)
    loss_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_macro_auc" in r]
    assert [r["step"] for r in loss_rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["loss"] == r["loss_bce"] for r in loss_rows)
    assert [r["epoch"] for r in val_rows] == [1, 2]
    assert all(0.0 <= r["val_macro_auc"] <= 1.0 for r in val_rows)
    assert sorted(p.name for p in (teacher_run / "checkpoints").iterdir()) == ["2", "4"]
    assert len(list((teacher_run / "best").iterdir())) == 1
    info = json.loads((teacher_run / "run_info.json").read_text())
    assert info["leads"] == list(data_lib.LEADS)


def test_rerun_of_finished_run_does_not_train(teacher_run):
    before = (teacher_run / "metrics.jsonl").read_text()
    config = run_dir.load_config(teacher_run)
    summary = train.train_and_evaluate(config, teacher_run, progress=False)
    assert summary["resumed_finished"] and summary["step"] == summary["total_steps"] == 4
    assert (teacher_run / "metrics.jsonl").read_text() == before


def test_resuming_with_a_different_config_is_refused(teacher_run):
    config = run_dir.load_config(teacher_run)
    config.train.learning_rate = 0.5
    config.train.log_every_steps = 7  # allowed: does not change what is trained
    with pytest.raises(ValueError, match=r"different config \(train.learning_rate: 0.01 -> 0.5\)"):
        train.train_and_evaluate(config, teacher_run, progress=False)


def test_few_steps_on_real_records_lower_the_training_loss(ptbxl_sample_shards):
    split = data_lib.open_split(ptbxl_sample_shards, "train")
    loader = input_pipeline.TrainBatches(
        split, global_batch_size=64, crop_length=250, random_crop=False, seed=0
    )
    config = tiny(teacher_config.get_config(), ptbxl_sample_shards, **{"teacher.arch": "resnet1d_wang"})  # the default net
    config.train.schedule = "constant"
    config.train.learning_rate = 3e-3
    parallel = parallel_lib.make_parallelism()
    training = step_lib.build_training(
        config,
        num_classes=split.num_classes,
        crop_length=250,
        total_steps=30,
        parallel=parallel,
        rng=jax.random.PRNGKey(0),
    )
    state, update = training.state, training.update
    batch = parallel.to_global(loader.batch_at(0))
    rng = jax.random.PRNGKey(1)
    losses = []
    for _ in range(25):
        state, metrics = update(state, batch, rng)
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


@pytest.mark.parametrize("variant", ["memory_bank", "in_batch"])
def test_interrupted_student_run_resumes_to_identical_metrics(
    ptbxl_sample_shards, teacher_run, tmp_path, variant
):
    def config(**kw):
        return tiny(
            student_config.get_config(),
            ptbxl_sample_shards,
            **{"teacher.runs": (str(teacher_run),)},
            **{"clt.variant": variant, "train.epochs": 3, **kw},
        )

    train.train_and_evaluate(config(), tmp_path / "straight", progress=False)
    stopped = train.train_and_evaluate(
        config(**{"train.stop_at_step": 3}), tmp_path / "resumed", progress=False
    )
    assert stopped["step"] == 3 and not stopped["finished"]
    # The planned stop is mid-epoch 2: the resumed run must restore the memory bank,
    # optimizer, RNG and data position exactly to reproduce the straight run.
    resumed = train.train_and_evaluate(config(), tmp_path / "resumed", progress=False)
    assert resumed["finished"]
    straight_rows, resumed_rows = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed_rows] == [r["step"] for r in straight_rows]
    for a, b in zip(straight_rows, resumed_rows):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-6, err_msg=f"step {a['step']} {k}")
    loss_keys = {k for r in straight_rows for k in r if k.startswith("loss_")}
    assert loss_keys == {"loss_bce", "loss_mkd", "loss_clt"}


@pytest.mark.parametrize("random_crop", [False, True])
def test_teacher_cache_gives_the_same_loss(ptbxl_sample_shards, teacher_run, random_crop):
    """Same batch: precomputed teacher outputs = in-step teacher forward, for the fixed
    crops and for random crops drawn from the cache's grid of starts (0.25 s)."""
    parallel = parallel_lib.make_parallelism()
    teacher_model, teacher_vars, _, _, _ = run_dir.load_trained_model(teacher_run, parallel=parallel)
    config = tiny(student_config.get_config(), ptbxl_sample_shards, **{"data.random_crop": random_crop})
    split = data_lib.open_split(ptbxl_sample_shards, "train")
    loader = input_pipeline.TrainBatches(
        split, global_batch_size=32, crop_length=250, random_crop=random_crop, seed=0,
        crop_grid=25 if random_crop else None,
    )
    cache = teachers.teacher_cache(teacher_model, teacher_vars, loader, batch_size=64, parallel=parallel)
    state, update = lead_i_student_step(
        config, split, teacher_model=teacher_model, teacher_vars=teacher_vars, parallel=parallel
    )
    rng = jax.random.PRNGKey(3)
    for step in (0, 5):
        indices, starts = loader.indices_at(step)
        if random_crop:
            assert (starts % 25 == 0).all() and len(set(starts.tolist())) > 1  # random, on the grid
            assert cache.logits.shape[:2] == (len(split), (1000 - 250) // 25 + 1)
        batch = loader.batch_at(step)
        cached = dict(batch, **cache.lookup(indices, starts))
        _, live = update(state, parallel.to_global(batch), rng)
        _, from_cache = update(state, parallel.to_global(cached), rng)
        for key in ("loss", "loss_bce", "loss_mkd", "loss_clt"):
            np.testing.assert_allclose(float(from_cache[key]), float(live[key]), rtol=1e-5, err_msg=key)


def test_a_cached_teacher_with_random_crops_needs_a_grid(ptbxl_sample_shards, teacher_run, tmp_path):
    config = tiny(
        student_config.get_config(), ptbxl_sample_shards, **{"teacher.runs": (str(teacher_run),), "teacher.cache": True}
    )
    with pytest.raises(ValueError, match="set --config.teacher.cache_stride_seconds"):
        train.train_and_evaluate(config, tmp_path / "s", progress=False)
    config.teacher.cache_stride_seconds = 0.25
    assert train.train_and_evaluate(config, tmp_path / "s", progress=False)["finished"]


def test_step_changes_student_and_heads_but_never_the_teacher(ptbxl_sample_shards, teacher_run):
    parallel = parallel_lib.make_parallelism()
    teacher_model, teacher_vars, _, _, _ = run_dir.load_trained_model(teacher_run, parallel=parallel)
    config = tiny(student_config.get_config(), ptbxl_sample_shards)
    split = data_lib.open_split(ptbxl_sample_shards, "train")
    state, update = lead_i_student_step(
        config, split, teacher_model=teacher_model, teacher_vars=teacher_vars, parallel=parallel
    )
    before = jax.device_get(state)
    loader = input_pipeline.TrainBatches(
        split, global_batch_size=32, crop_length=250, random_crop=True, seed=0
    )
    after, _ = update(state, parallel.to_global(loader.batch_at(0)), jax.random.PRNGKey(0))
    after = jax.device_get(after)

    def changed(a, b):
        return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    assert changed(before.params["model"], after.params["model"])
    assert changed(before.params["heads"]["student"], after.params["heads"]["student"])
    assert changed(before.params["heads"]["teacher"], after.params["heads"]["teacher"])
    assert not changed(before.teacher, after.teacher)
    assert changed(before.memory_bank.student, after.memory_bank.student)


def _poison_record(shards, index, value, *, rehash):
    signals = np.load(shards / "train_signals.npy", mmap_mode="r+")
    signals[index] = value
    signals.flush()
    del signals
    if rehash:  # the damage predates the manifest (as if data_prep had written it)
        manifest = json.loads((shards / "manifest.json").read_text())
        manifest["files"]["train_signals.npy"] = data_lib._sha256(shards / "train_signals.npy")
        (shards / "manifest.json").write_text(json.dumps(manifest))


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(ptbxl_sample_shards, tmp_path, monkeypatch):
    """A NaN in a record first drawn in epoch 2: epoch 1 is saved, the run stops in epoch 2,
    and the message names the record and the shards instead of blaming the learning rate.
    verify_shards now finds such a record before training (test_config_checks); it is
    switched off here to test the trainer's own check, the backstop for what it misses."""
    monkeypatch.setattr(data_lib, "verify_shards", lambda *args, **kwargs: 0)
    shards = tmp_path / "shards"
    shutil.copytree(ptbxl_sample_shards, shards)
    config = tiny(teacher_config.get_config(), shards)
    split = data_lib.open_split(shards, "train")
    loader = input_pipeline.TrainBatches(
        split, global_batch_size=32, crop_length=250, random_crop=True, seed=int(config.seed)
    )
    epoch1 = set(np.concatenate([loader.indices_at(s)[0] for s in (0, 1)]).tolist())
    epoch2 = set(np.concatenate([loader.indices_at(s)[0] for s in (2, 3)]).tolist())
    poisoned = min(epoch2 - epoch1)
    _poison_record(shards, poisoned, np.nan, rehash=True)

    workdir = tmp_path / "run"
    with pytest.raises(train.TrainingDivergedError, match=r"non-finite loss at step [34]") as error:
        train.train_and_evaluate(config, workdir, progress=False)
    message = str(error.value)
    assert f"record(s) {split.record_ids[poisoned]} of {shards}" in message and "verify_shards" in message
    assert "learning rate" not in message
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]
    _, variables, _, _, meta = run_dir.load_trained_model(workdir, which="latest")
    assert meta["step"] == 2
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(variables)))


def test_non_finite_loss_on_finite_batches_is_reported_as_divergence(ptbxl_sample_shards):
    split = data_lib.open_split(ptbxl_sample_shards, "train")
    loader = input_pipeline.TrainBatches(split, global_batch_size=32, crop_length=250, random_crop=True, seed=0)
    with pytest.raises(train.TrainingDivergedError, match=r"steps 1-2 are finite, so the optimisation diverged"):
        train._check_finite(
            {"loss": float("nan")}, step=2, since=0, loader=loader, data_dir=str(ptbxl_sample_shards)
        )
    train._check_finite({"loss": 0.5}, step=2, since=0, loader=loader, data_dir=str(ptbxl_sample_shards))


def test_flipped_bytes_in_the_shards_stop_training_before_it_starts(ptbxl_sample_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(ptbxl_sample_shards, shards)
    with open(shards / "train_signals.npy", "r+b") as f:
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(data_lib.ShardError, match=r"train_signals.npy: sha256 .* != manifest"):
        train.train_and_evaluate(tiny(teacher_config.get_config(), shards), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_shard_hashes_are_cached_until_a_file_changes(ptbxl_sample_shards, tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    shutil.copytree(ptbxl_sample_shards, shards)
    hashed = []
    real = data_lib._sha256
    monkeypatch.setattr(data_lib, "_sha256", lambda path: hashed.append(path.name) or real(path))
    files = len(json.loads((shards / "manifest.json").read_text())["files"])
    assert data_lib.verify_shards(shards, cache_dir=tmp_path / "cache") == files
    assert len(hashed) == files
    hashed.clear()
    data_lib.verify_shards(shards, cache_dir=tmp_path / "cache")
    assert hashed == []
    _poison_record(shards, 0, 1.0, rehash=False)  # a write: new modification time, hashed again
    with pytest.raises(data_lib.ShardError, match="train_signals.npy"):
        data_lib.verify_shards(shards, cache_dir=tmp_path / "cache")
    assert hashed == ["train_signals.npy"]


def test_unknown_method_and_leads_are_clear_errors(ptbxl_sample_shards, tmp_path):
    config = tiny(student_config.get_config(), ptbxl_sample_shards, method="distill")
    with pytest.raises(ValueError, match="config.method must be one of"):
        train.train_and_evaluate(config, tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="V7"):
        run_config.parse_leads("I,V7")
    assert run_config.parse_leads("I, II ,V2") == ["I", "II", "V2"]
    assert run_config.parse_leads("all") == list(data_lib.LEADS)
    config = tiny(student_config.get_config(), ptbxl_sample_shards)
    with pytest.raises(ValueError, match="needs a trained teacher"):
        train.train_and_evaluate(config, tmp_path / "b", progress=False)


def _cli(*args, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "experiments.train", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        **kwargs,
    )


def test_cli_acceptance_commands_with_overrides(ptbxl_sample_shards, tmp_path):
    common = [
        f"--config.data.dir={ptbxl_sample_shards}",
        "--config.train.epochs=1",
        *TINY_NET_FLAGS,
        "--config.train.batch_size=32",
    ]
    teacher = tmp_path / "T"
    result = _cli("--config=experiments/configs/teacher.py", f"--workdir={teacher}", *common)
    assert result.returncode == 0, result.stderr[-3000:]
    student = tmp_path / "S"
    args = [
        "--config=experiments/configs/student.py",
        f"--workdir={student}",
        *common,
        f"--config.teacher.runs={teacher}",
        "--config.student.leads=I,II",
        "--config.method=mvkt",
        "--config.clt.variant=memory_bank",
        "--config.clt.num_negatives=8",
    ]
    result = _cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((student / "config.json").read_text())
    assert config["student"]["leads"] == "I,II" and config["clt"]["num_negatives"] == 8
    rows = read_metrics(student)
    assert rows and all(np.isfinite(v) for r in rows for v in r.values())
    assert list((student / "checkpoints").iterdir())
    again = _cli(*args)
    assert again.returncode == 0 and "already finished" in again.stdout + again.stderr
    assert read_metrics(student) == rows


def test_sigterm_saves_and_exits_cleanly(ptbxl_sample_shards, tmp_path):
    workdir = tmp_path / "run"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "experiments.train",
            "--config=experiments/configs/teacher.py",
            f"--workdir={workdir}",
            f"--config.data.dir={ptbxl_sample_shards}",
            "--config.train.epochs=500",
            *TINY_NET_FLAGS,
            "--config.train.batch_size=32",
            "--config.train.log_every_steps=1",
        ],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    assert "SIGTERM at step" in stderr
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir()]
    assert steps and max(steps) < 500 * 2
    last_logged = max(json.loads(l)["step"] for l in metrics.read_text().splitlines())
    assert max(steps) == last_logged


def test_checkpoints_every_n_epochs_keep_the_best_at_every_improving_validation(ptbxl_sample_shards, tmp_path):
    config = tiny(teacher_config.get_config(), ptbxl_sample_shards, **{
        "train.epochs": 3, "train.checkpoint_every_epochs": 2, "train.keep_checkpoints": 5})
    train.train_and_evaluate(config, tmp_path / "run", progress=False)
    # checkpoints/ at epoch 2 (step 4) and at the end (step 6), not at epoch 1 (step 2).
    assert run_dir.checkpoint_steps(tmp_path / "run") == [4, 6]
    validations = [r for r in read_metrics(tmp_path / "run") if "val_macro_auc" in r]
    assert [r["step"] for r in validations] == [2, 4, 6]
    best_steps = [int(p.name) for p in (tmp_path / "run" / "best").iterdir() if p.name.isdigit()]
    aucs = [r["val_macro_auc"] for r in validations]
    assert best_steps == [validations[int(np.argmax(aucs))]["step"]]  # the first of the best, saved when reached
