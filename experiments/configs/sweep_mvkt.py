"""Hyper-parameter sweeps of the MVKT lead-I student (experiments/configs/student.py).

Pick a sweep with the config argument, and give the data and the trained teacher
(shared by every run) as overrides::

    python -m experiments.sweep --config=experiments/configs/sweep_mvkt.py:alpha_beta \
        --workdir=runs/sweep_alpha_beta --config.data.dir=SHARDS \
        --config.teacher.runs=runs/pipeline/runs/teacher_seed0

| sweep | runs | what varies |
|---|---|---|
| ``alpha_beta`` (default) | 9 | MKD weight alpha x CLT weight beta |
| ``alpha`` | 5 | alpha alone (beta = 0.8) |
| ``beta`` | 5 | beta alone (alpha = 1.0) |
| ``temperature`` | 9 | MKD temperature x CLT temperature |
| ``negatives`` | 4 | K, the memory-bank negatives per anchor |
| ``lr`` | 8 | learning rate, for the BCE baseline and MVKT alike (tune both or neither) |
| ``seeds`` | 3 | only the seed: the noise floor to read the other sweeps against |

``experiments.train`` accepts the same ``--config=...sweep_mvkt.py:<sweep>``: the
sweep argument does not change the training config, so a printed command trains
exactly the run the launcher hashed.
"""

from experiments.configs import student


def _sweeps(hyper):
    return {
        "alpha_beta": hyper.product([hyper.sweep("config.alpha", [0.5, 1.0, 2.0]),
                                     hyper.sweep("config.beta", [0.4, 0.8, 1.6])]),
        "alpha": hyper.sweep("config.alpha", [0.25, 0.5, 1.0, 2.0, 4.0]),
        "beta": hyper.sweep("config.beta", [0.2, 0.4, 0.8, 1.6, 3.2]),
        # MKD at T = 1 is the paper's choice; CRD's contrastive temperature is 0.07.
        "temperature": hyper.product([hyper.sweep("config.mkd_temperature", [1.0, 2.0, 4.0]),
                                      hyper.sweep("config.clt.temperature", [0.05, 0.07, 0.1])]),
        "negatives": hyper.product([hyper.fixed("config.clt.variant", "memory_bank"),
                                    hyper.sweep("config.clt.num_negatives", [256, 1024, 4096, 16384])]),
        # A gain that only holds at MVKT's tuned learning rate is no gain: tune the baseline too.
        "lr": hyper.product([hyper.sweep("config.method", ["bce", "mvkt"]),
                             hyper.sweep("config.train.learning_rate", [1e-3, 3e-3, 1e-2, 3e-2])]),
        "seeds": hyper.sweep("config.seed", [0, 1, 2]),
    }


SWEEPS = ("alpha_beta", "alpha", "beta", "temperature", "negatives", "lr", "seeds")
DEFAULT = "alpha_beta"


def _name(arg):
    name = arg or DEFAULT
    if name not in SWEEPS:
        raise ValueError(f"unknown sweep {name!r} in sweep_mvkt.py; choose one of {', '.join(SWEEPS)}")
    return name


def get_config(arg=None):
    _name(arg)
    return student.get_config()


def get_hyper(hyper, arg=None):
    return _sweeps(hyper)[_name(arg)]
