"""What every entry point does the same way: console log level and how known failures end.

Progress and results are printed by the trainer and the runners themselves; known
failures end the program with one line naming the file and the problem, not a
traceback (pass --verbosity=1 to get the traceback too).
"""

import contextlib
import sys
import traceback

from absl import flags, logging

from experiments import study
from mvkt import train


def quiet_library_logs():
    """WARNING and above unless --verbosity was given: orbax logs every file it writes at INFO."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


@contextlib.contextmanager
def exit_on_known_errors():
    """Exit 0 after a preemption (checkpoint saved, the same command continues);
    exit 1 with a one-line message for bad input, a diverged or an unfinished run."""
    try:
        yield
    except train.TrainingPreempted as e:
        print(e, file=sys.stderr)
        sys.exit(0)
    except (FileNotFoundError, ValueError, train.TrainingDivergedError, study.UnfinishedRunError) as e:
        if logging.get_verbosity() >= logging.DEBUG:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
