"""The 12-lead teacher: BCE on all leads."""

from experiments.configs import default


def get_config(arg=None):
    config = default.get_config(arg)
    config.method = "bce"
    config.student.leads = "all"
    return config
