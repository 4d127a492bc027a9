"""The official MVKT-ECG recipe's student: lead I, MVKT (MKD + CLT with the CRD memory bank),
xresnet1d101, trained as ``paper.py`` says (give its teacher with --config.teacher.runs)."""

from experiments.configs import default, paper


def get_config(arg=None):
    config = paper.recipe(default.get_config(arg))
    config.method = "mvkt"
    config.student.leads = "I"
    return config
