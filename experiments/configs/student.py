"""A student on lead I trained with MVKT (override --config.method for baselines)."""

from experiments.configs import default


def get_config(arg=None):
    config = default.get_config(arg)
    config.method = "mvkt"
    config.student.leads = "I"
    return config
