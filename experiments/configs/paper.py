"""The official MVKT-ECG recipe (QINYZz/MVKT-ECG, ``train_teacher.sh`` / ``transferring.sh``):
the 12-lead xresnet1d101 teacher. ``paper_student.py`` is its lead-I MVKT student.

    python -m experiments.train --config=experiments/configs/paper.py --workdir=runs/paper_T \
        --config.data.dir=SHARDS
    python -m experiments.train --config=experiments/configs/paper_student.py --workdir=runs/paper_S \
        --config.data.dir=SHARDS --config.teacher.runs=runs/paper_T

As the official code: xresnet1d101 teacher and student, whole 10-s records at 100 Hz, batch 32,
100 epochs, ``torch.optim.Adam`` (L2 weight decay 1e-4) at 1e-3 with its ``adjust_learning_rate``
(0.001 * (epoch + 1) for 15 epochs, then 1e-3, x0.1 at epochs 40 and 70: schedule
``mvkt_official``), no gradient clipping, no augmentation, CLT with the CRD memory bank
(alpha 1, beta 0.8). As everywhere in mvkt (not as the official code, which also keeps the
checkpoint best on test): the checkpoint is selected on validation macro-AUC only.
"""

from experiments.configs import default


def recipe(config):
    """The official training settings on any config (teacher or student)."""
    for net in (config.teacher, config.student):
        net.arch = "xresnet1d101"
    config.data.crop_seconds = 10.0
    config.data.random_crop = False  # a 10-s crop of a 10-s record is the record
    config.train.batch_size = 32
    config.train.epochs = 100
    config.train.optimizer = "adam"
    config.train.learning_rate = 1e-3
    config.train.weight_decay = 1e-4
    config.train.schedule = "mvkt_official"
    config.train.grad_clip_norm = 0.0
    config.clt.variant = "memory_bank"
    config.alpha = 1.0
    config.beta = 0.8
    return config


def get_config(arg=None):
    config = recipe(default.get_config(arg))
    config.method = "bce"
    config.trains = "teacher"
    config.teacher.leads = "all"
    return config
