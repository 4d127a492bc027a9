"""Trains a teacher or a student: the absl entry point around ``mvkt.train``.

    python -m experiments.train --config=experiments/configs/teacher.py --workdir=T \
            --config.data.dir=SHARDS
    python -m experiments.train --config=experiments/configs/student.py --workdir=S \
            --config.data.dir=SHARDS --config.teacher_workdir=T --config.student.leads=I \
            --config.method=mvkt --config.clt.variant=memory_bank

Running the same command again resumes (or does nothing if the run finished).
Multi-host (TPU pods, several GPU hosts): pass --distributed on every host.
"""


import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.cli import exit_on_known_errors, quiet_library_logs
from mvkt import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/teacher.py", "training config file", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics.jsonl)", required=True)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "call jax.distributed.initialize() (one process per host)"
)


def main(argv):
    del argv
    quiet_library_logs()
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    logging.info("devices: %s", jax.devices())
    with exit_on_known_errors():
        summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    print(summary)


if __name__ == "__main__":
    app.run(main)
