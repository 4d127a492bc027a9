"""Device-resident training data and several steps per dispatch (mvkt/dispatch.py): the same
batches and metrics as the host loader, points of the cadence unchanged, exact resumption."""

import json
import shutil

import jax
import numpy as np
import pytest

from experiments.configs import student as student_config
from experiments.configs import teacher as teacher_config
from helpers import read_metrics, tiny
from mvkt import data as data_lib
from mvkt import dispatch
from mvkt import input_pipeline
from mvkt import parallel as parallel_lib
from mvkt import periodic
from mvkt import train

TIMING_KEYS = ("step_time_s", "samples_per_s")


def metrics_without_timing(workdir):
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in read_metrics(workdir)]


def trained(config, workdir):
    train.train_and_evaluate(config, workdir, progress=False)
    return json.loads((workdir / "timings.json").read_text())


# Batch 16: 4 steps per epoch of the sample's 67 training records; logs every 6 steps and at
# epoch ends: points 4, 6, 8, 12, so K = 4 runs calls of 4 steps (0-4, 8-12) and of one.
K_OVERRIDES = {"train.epochs": 3, "train.batch_size": 16, "train.log_every_steps": 6}


@pytest.mark.parametrize("k", [1, 4])
def test_device_resident_data_gives_the_host_loaders_metrics_bit_for_bit(ptbxl_sample_shards, tmp_path, k):
    rows, placements = {}, {}
    for name, gb in (("host", 0.0), ("devices", -1.0)):
        config = tiny(teacher_config.get_config(), ptbxl_sample_shards, **K_OVERRIDES, **{
            "train.device_data_gb": gb, "train.steps_per_dispatch": k})
        placements[name] = trained(config, tmp_path / name)["training_data"]
        rows[name] = metrics_without_timing(tmp_path / name)
    assert placements == {"host": "host", "devices": "devices"}
    assert any("val_macro_auc" in r for r in rows["host"])
    assert rows["devices"] == rows["host"]
    # Log points stay where they are with K = 1.
    assert sorted({r["step"] for r in rows["host"]}) == [4, 6, 8, 12]


def test_a_memory_bank_student_on_device_data_equals_the_host_loader(ptbxl_sample_shards, tiny_teacher, tmp_path):
    rows = {}
    for name, gb in (("host", 0.0), ("devices", -1.0)):
        config = tiny(student_config.get_config(), ptbxl_sample_shards, **K_OVERRIDES, **{
            "train.device_data_gb": gb, "train.steps_per_dispatch": 2})
        config.method, config.teacher.runs = "mvkt", (str(tiny_teacher),)
        trained(config, tmp_path / name)
        rows[name] = metrics_without_timing(tmp_path / name)
    assert {"loss_mkd", "loss_clt"} <= set(rows["host"][0])
    assert rows["devices"] == rows["host"]


def test_a_stopped_k_step_run_resumes_to_the_uninterrupted_runs_metrics(ptbxl_sample_shards, tmp_path):
    overrides = {**K_OVERRIDES, "train.steps_per_dispatch": 4}
    whole = tiny(teacher_config.get_config(), ptbxl_sample_shards, **overrides)
    trained(whole, tmp_path / "whole")
    stopped = tiny(teacher_config.get_config(), ptbxl_sample_shards, **overrides, **{"train.stop_at_step": 5})
    first = trained(stopped, tmp_path / "resumed")
    assert (first["start_step"], first["end_step"]) == (0, 5)
    second = trained(tiny(teacher_config.get_config(), ptbxl_sample_shards, **overrides), tmp_path / "resumed")
    assert (second["start_step"], second["end_step"]) == (5, 12)
    # The resumed run's rows after its first log point (whose means cover step 6 alone, not steps 5-6)
    # equal the uninterrupted run's: validations at 8 and 12, the logs of steps 8 and 12.
    after = [r for r in metrics_without_timing(tmp_path / "whole") if r["step"] > 6]
    assert metrics_without_timing(tmp_path / "resumed")[-len(after):] == after
    assert set(second["phases_s"]) >= {"setup", "restore", "compile", "dispatch", "device_wait", "validation",
                                      "checkpointing"}


def test_crops_cut_on_the_devices_are_split_crop_for_ragged_and_restandardised_records(ptbxl_sample_shards):
    """Records shorter than the crop (zero padding) and a re-standardised fold split, whose
    padding is not zero: the device copy reproduces ``Split.crop`` exactly."""
    parallel = parallel_lib.make_parallelism()
    folds = {"train": [1, 2, 3, 4, 5, 6], "val": [7, 8], "test": [9, 10]}
    for split in (data_lib.open_split(ptbxl_sample_shards, "train"),
                  data_lib.open_split(ptbxl_sample_shards, "train", folds=folds)):
        crop = int(np.max(split.lengths)) + 37  # longer than every record: padding on every row
        data = dispatch.DeviceData.place(split, crop_length=crop, parallel=parallel, chunk=7)
        rng = np.random.default_rng(0)
        index = rng.integers(0, len(split), 16).astype(np.int32)
        start = np.zeros(16, np.int32)
        batch = dispatch.crops_on_device(data, parallel.to_global({"index": index, "start": start}), crop,
                                         parallel.batch)
        np.testing.assert_array_equal(np.asarray(batch["x"]), split.crop(index, start, crop))
        np.testing.assert_array_equal(np.asarray(batch["y"]), split.y[index].astype(np.float32))
        loader = input_pipeline.TrainBatches(split, global_batch_size=16, crop_length=250, random_crop=True, seed=3)
        data = dispatch.DeviceData.place(split, crop_length=250, parallel=parallel)
        index, start = loader.indices_at(5)
        batch = dispatch.crops_on_device(
            data, parallel.to_global({"index": index.astype(np.int32), "start": start.astype(np.int32)}), 250,
            parallel.batch)
        np.testing.assert_array_equal(np.asarray(batch["x"]), loader.batch_at(5)["x"])


def test_calls_never_run_past_a_point_of_the_cadence():
    cadence = periodic.Cadence(steps_per_epoch=11, total_steps=33, log_every=10, eval_every_epochs=1, stop_at=25)

    class Chunks(dispatch.Dispatcher):
        def __init__(self, k):
            self.k = k

    for k in (1, 4, 10, 50):
        chunks = list(Chunks(k).chunks(0, 33, cadence))
        steps = [first + i for first, count in chunks for i in range(count)]
        assert steps == list(range(33))
        assert all(count in (1, k) for _, count in chunks)
        ends = {first + count for first, count in chunks}
        # Past the planned stop every step is one (the loop has stopped there).
        points = {d for d in range(1, 26) if cadence.log_point(d)}
        assert points <= ends, (k, sorted(points - ends))


def test_the_first_call_of_each_program_is_compilation_not_dispatch():
    """The loop charges a program's first call to "compile" (timings.json): the K-step program's
    and the one-step program's before a cadence point, not only the run's first call."""
    import jax.numpy as jnp

    class Loader:
        crop_length = 8

    def update_fn(state, batch, rng):
        return state + jnp.sum(batch["index"]), {"loss": state}

    calls = dispatch.Dispatcher(update_fn=update_fn, host_update=jax.jit(update_fn), loader=Loader(), source=None,
                                parallel=parallel_lib.make_parallelism(), steps_per_dispatch=4)
    stacked, one = {"index": np.ones((4, 2), np.int32)}, {"index": np.ones(2, np.int32)}
    state, rng = jnp.zeros((), jnp.int32), jax.random.PRNGKey(0)
    assert calls.first_call(stacked) and calls.first_call(one)
    state, _ = calls(state, stacked, rng)
    assert not calls.first_call(stacked) and calls.first_call(one)
    state, _ = calls(state, one, rng)
    state, metrics = calls(state, stacked, rng)
    assert not calls.first_call(stacked) and not calls.first_call(one)
    assert int(state) == 8 + 2 + 8 and metrics["loss"].shape == (4,)


def test_the_budget_decides_where_the_training_data_lives(ptbxl_sample_shards):
    split = data_lib.open_split(ptbxl_sample_shards, "train")
    needed = dispatch.device_bytes(split, 250)
    assert needed == len(split) * (1000 * 12 + split.num_classes) * 4
    assert dispatch.choose_device_data(split, crop_length=250, device_data_gb=-1.0)[0]
    assert not dispatch.choose_device_data(split, crop_length=250, device_data_gb=0.0)[0]
    on_device, why = dispatch.choose_device_data(split, crop_length=250, device_data_gb=needed / 2**30 / 2)
    assert not on_device and "host loader" in why and "device_data_gb" in why
    assert dispatch.memory_budget_bytes(-1.0) > 0


def test_a_run_may_change_how_its_steps_are_dispatched_when_it_resumes(ptbxl_sample_shards, tmp_path):
    config = tiny(teacher_config.get_config(), ptbxl_sample_shards, **{"train.stop_at_step": 2})
    trained(config, tmp_path / "run")
    resumed = tiny(teacher_config.get_config(), ptbxl_sample_shards, **{
        "train.steps_per_dispatch": 2, "train.device_data_gb": 0.0})
    report = trained(resumed, tmp_path / "run")
    assert (report["start_step"], report["end_step"], report["steps_per_dispatch"]) == (2, 4, 2)
    shutil.rmtree(tmp_path / "run")


def test_k_step_calls_follow_the_one_step_run_within_float32_rounding(ptbxl_sample_shards, tmp_path):
    rows = {}
    for k in (1, 4):
        config = tiny(teacher_config.get_config(), ptbxl_sample_shards, **K_OVERRIDES,
                      **{"train.steps_per_dispatch": k})
        trained(config, tmp_path / f"k{k}")
        rows[k] = metrics_without_timing(tmp_path / f"k{k}")
    assert [r.keys() for r in rows[4]] == [r.keys() for r in rows[1]]
    for a, b in zip(rows[4], rows[1]):
        for key, value in a.items():
            if isinstance(value, float):
                np.testing.assert_allclose(value, b[key], rtol=1e-3, err_msg=f"step {a['step']} {key}")
