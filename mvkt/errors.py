"""The project's own failures, which entry points report in one line (``experiments.cli``).

Standard library only: ``data_prep`` raises ``RecordError`` too without importing JAX."""


class TrainingDivergedError(RuntimeError):
    """A loss term became NaN/inf; the last good checkpoint is kept."""


class TrainingPreempted(Exception):
    """SIGTERM arrived: a checkpoint was saved and the process should exit.

    Raised (not returned) so that callers running several trainings in a row,
    like the study runners, stop too instead of moving on to the next run.
    """


class UnfinishedRunError(RuntimeError):
    """A run stopped before its last step (e.g. ``train.stop_at_step``): nothing may build on it."""


class RecordError(ValueError):
    """A record (a file read by data_prep, or a trace given to predict) cannot be used; the
    message names the record and the problem."""
