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
