"""Helpers shared by the training-side tests (imported as ``helpers``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from mvkt import run_dir

TIMING_KEYS = {"step_time_s", "samples_per_s"}

# The net of tests that are not about the architecture: fcn_wang, the smallest registered net
# (three convolutions), at quarter width. A cold suite spends most of its time compiling and
# tracing train steps; the architectures themselves are tested in test_models.py, and the
# default resnet1d_wang is still trained end to end by test_train's learning test,
# tests/multidevice_check.py and the README pipeline test.
TEST_ARCH = "fcn_wang"
# The same for the command-line entry points.
TINY_NET_FLAGS = [
    f"--config.student.arch={TEST_ARCH}",
    f"--config.teacher.arch={TEST_ARCH}",
    "--config.student.width_mult=0.25",
    "--config.teacher.width_mult=0.25",
]


def tiny(config, shards, **overrides):
    """A config small enough for CI: quarter-width TEST_ARCH nets (student and teacher), batch 32 (2 steps per
    epoch on the 67 train records of the PTB-XL sample), 2 epochs; ``overrides`` as ``{"train.epochs": 3}``."""
    config.data.dir = str(shards)
    config.student.arch = TEST_ARCH
    config.teacher.arch = TEST_ARCH
    config.student.width_mult = 0.25
    config.teacher.width_mult = 0.25
    config.train.batch_size = 32
    config.train.epochs = 2
    config.train.log_every_steps = 1
    config.eval.batch_size = 64
    config.clt.num_negatives = 16
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def read_metrics(workdir):
    """metrics.jsonl rows without the timing columns (they differ between identical runs)."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in run_dir.metric_rows(workdir)]


def read_events(workdir) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars of a run folder, {tag: [(step, value), ...]} in file order, read
    with tensorboardX's protos from the TFRecord framing (length, crc, event, crc)."""
    import pathlib
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(pathlib.Path(workdir).rglob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def mkd_step_against_by_hand(config, shards, teacher_dir, inputs):
    """(the step's MKD term, MKD recomputed by hand) for one jitted step of ``config`` (an MKD
    student of ``teacher_dir``) on the first training batch. ``inputs(step_rng, x)`` returns the
    (student input, teacher input) the step should have used, from the step's random streams
    and the 12-lead crop ``x``: what a test of an input transform asserts."""
    import jax

    from mvkt import data as data_lib
    from mvkt import input_pipeline, losses
    from mvkt import parallel as parallel_lib
    from mvkt import step as step_lib

    parallel = parallel_lib.make_parallelism()
    teacher_model, teacher_vars, _, _, _ = run_dir.load_trained_model(teacher_dir, parallel=parallel)
    split = data_lib.open_split(shards, "train")
    training = step_lib.build_training(config, num_classes=split.num_classes, crop_length=250, total_steps=10,
                                       parallel=parallel, rng=jax.random.PRNGKey(0), train_labels=split.y,
                                       teacher=(teacher_model, teacher_vars), donate=False,
                                       label_names=split.label_names)
    batch = input_pipeline.TrainBatches(split, global_batch_size=32, crop_length=250, random_crop=True,
                                        seed=0).batch_at(0)
    rng = jax.random.PRNGKey(5)
    _, metrics = training.update(training.state, parallel.to_global(batch), rng)

    step_rng = jax.random.fold_in(rng, 0)
    x_student, x_teacher = inputs(step_rng, batch)
    state = training.state
    student_logits = training.model.apply(
        {"params": state.params["model"], "batch_stats": state.batch_stats}, x_student, train=True,
        rngs={"dropout": jax.random.split(step_rng)[0]}, mutable=["batch_stats"])[0][0]
    teacher_logits = teacher_model.apply(teacher_vars, x_teacher, train=False)[0]
    return float(metrics["loss_mkd"]), float(losses.mkd_loss(student_logits=student_logits,
                                                             teacher_logits=teacher_logits))
