"""Runs one train step on 1 device and on 8 simulated CPU devices; prints the max differences.

Executed by tests/test_multidevice.py in a fresh process (the CPU device count
must be fixed before JAX initialises). SGD with learning rate 1 makes
``params_after - params_before`` the negative gradient, so comparing the new
parameters compares gradients; BatchNorm statistics, the CLT memory bank and
every loss term are compared too.
"""

import json
import os
import sys

os.environ["JAX_NUM_CPU_DEVICES"] = "8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from experiments.configs import student as student_config  # noqa: E402
from mvkt import step as step_lib  # noqa: E402
from mvkt import data as data_lib  # noqa: E402
from mvkt import input_pipeline, models  # noqa: E402
from mvkt import parallel as parallel_lib  # noqa: E402


def one_step(parallel, *, method, variant, split, teacher_model, teacher_vars):
    config = student_config.get_config()
    config.method, config.clt.variant = method, variant
    config.student.width_mult = 0.25
    config.clt.num_negatives = 16
    training = step_lib.build_training(
        config,
        num_classes=split.num_classes,
        crop_length=250,
        total_steps=1,
        parallel=parallel,
        rng=jax.random.PRNGKey(0),
        train_labels=split.y,
        teacher=(teacher_model, teacher_vars),
        optimizer=(optax.sgd(1.0), optax.constant_schedule(1.0)),
    )
    state, update = training.state, training.update
    loader = input_pipeline.TrainBatches(
        split, global_batch_size=32, crop_length=250, random_crop=True, seed=0
    )
    batch = parallel.to_global(loader.batch_at(0))
    new_state, metrics = update(state, batch, parallel.replicate(jax.random.PRNGKey(7)))
    return jax.device_get((new_state.params, new_state.batch_stats, new_state.memory_bank, metrics))


def max_abs_diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def main(shards):
    assert jax.device_count() == 8, jax.devices()
    split = data_lib.open_split(shards, "train")
    teacher_model = models.create_model("resnet1d_wang", num_classes=split.num_classes, width_mult=0.25)
    # Host copy: each step's state gets its own device buffers (the step donates its state).
    teacher_vars = jax.device_get(
        teacher_model.init(jax.random.PRNGKey(1), jnp.zeros((1, 250, 12)), train=False)
    )
    one = parallel_lib.make_parallelism(jax.devices()[:1])
    eight = parallel_lib.make_parallelism(jax.devices())
    report = {}
    for method, variant in [("bce", "in_batch"), ("mvkt", "in_batch"), ("mvkt", "memory_bank")]:
        results = [
            one_step(
                p,
                method=method,
                variant=variant,
                split=split,
                teacher_model=teacher_model,
                teacher_vars=teacher_vars,
            )
            for p in (one, eight)
        ]
        (p1, bs1, bank1, m1), (p8, bs8, bank8, m8) = results
        report[f"{method}/{variant}"] = {
            "grad_max_abs_diff": max_abs_diff(p1, p8),
            "grad_max_abs": max(float(np.max(np.abs(x))) for x in jax.tree.leaves(p1)),
            "batch_stats_max_abs_diff": max_abs_diff(bs1, bs8),
            "memory_bank_max_abs_diff": max_abs_diff(bank1, bank8) if bank1 is not None else 0.0,
            "metrics_1": {k: float(v) for k, v in m1.items()},
            "metrics_8": {k: float(v) for k, v in m8.items()},
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
