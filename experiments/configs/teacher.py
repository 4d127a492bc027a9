"""The 12-lead teacher: BCE on all leads, its net described by ``config.teacher``."""

from experiments.configs import default


def get_config(arg=None):
    config = default.get_config(arg)
    config.method = "bce"
    config.trains = "teacher"
    config.teacher.leads = "all"
    return config
