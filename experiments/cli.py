"""Console logging policy shared by the entry points."""

from absl import flags, logging


def quiet_library_logs():
    """WARNING and above unless --verbosity was given: orbax logs every file it writes at INFO.

    Progress and results are printed by the trainer itself (tqdm bar, one line per epoch).
    """
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
