"""What every entry point does the same way: multi-host start-up, console logging, how
known failures end.

Every entry point (train, evaluate, and the study runners) calls ``start()`` first
inside ``exit_on_known_errors()``. Progress and results are printed by the trainer and
the runners themselves; known failures end the program with one line naming the file
and the problem, not a traceback (pass --verbosity=1 to get the traceback too).

Multi-host (one process per host, every host runs the same command):
``--distributed`` with ``--coordinator_address``, ``--num_processes`` and
``--process_id``; unset flags fall back to ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, then to jax's cluster auto-detection
(SLURM, Cloud TPU, ...). Only process 0 prints results and writes files; the others
log warnings and errors only.
"""

import contextlib
import logging as std_logging
import os
import pathlib
import re
import sys
import traceback

import jax
from absl import flags, logging

from experiments import hyper
from mvkt import distributed, errors, run_dir

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "multi-process job: one process per host, every host runs the same command"
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    f"host:port of process 0 (with --distributed; default ${distributed.ENV_COORDINATOR}, "
    "then cluster auto-detection)",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, f"number of processes (default ${distributed.ENV_NUM_PROCESSES} or auto-detected)"
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, f"this process's index (default ${distributed.ENV_PROCESS_ID} or auto-detected)"
)
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds",
    distributed.DEFAULT_HEARTBEAT_TIMEOUT_S,
    "a process silent this long is taken as dead and the job ends with an error",
)

# Failures that end an entry point with one line (exit 1) instead of a traceback.
KNOWN_ERRORS = (
    FileNotFoundError,
    ValueError,
    OSError,
    errors.TrainingDivergedError,
    errors.UnfinishedRunError,
    run_dir.RunLockedError,
    distributed.OtherProcessFailedError,
)

MULTI_HOST_FLAGS = ("distributed", "coordinator_address", "num_processes", "heartbeat_timeout_seconds")


class _BackgroundErrorFilter(std_logging.Filter):
    """Drops the error logs of orbax's background save threads and asyncio's leftovers: a
    failed save (disk full, read-only folder) logs hundreds of tracebacks there, then
    surfaces once in the main thread, where ``exit_on_known_errors`` reports it in one line."""

    SOURCES = (f"{os.sep}orbax{os.sep}", f"{os.sep}asyncio{os.sep}")

    def filter(self, record: std_logging.LogRecord) -> bool:
        return not (record.levelno >= std_logging.ERROR and any(s in record.pathname for s in self.SOURCES))


class _LibraryInfoFilter(std_logging.Filter):
    """INFO of mvkt and the entry points, but not of the libraries (orbax logs every file
    it writes at INFO; jax its compilation cache)."""

    OURS = tuple(f"{os.sep}{package}{os.sep}" for package in ("mvkt", "experiments", "data_prep"))

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or any(s in record.pathname for s in self.OURS)


def quiet_library_logs():
    """Our INFO lines (the start-up echo, progress) and the libraries' warnings; --verbosity
    lowers ours (-1: warnings only) or, at 1 (debug), shows the libraries' INFO and the
    background-thread errors of orbax and asyncio too."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.INFO)
    if logging.get_verbosity() < logging.DEBUG:
        for handler in {logging.get_absl_handler(), *std_logging.getLogger().handlers}:
            handler.addFilter(_BackgroundErrorFilter())
            handler.addFilter(_LibraryInfoFilter())
        sys.unraisablehook = _quiet_closed_loop_callbacks


def _quiet_closed_loop_callbacks(unraisable, _default=sys.unraisablehook):
    """After a failed save or restore, orbax leaves coroutines and tensorstore callbacks that
    raise into the void ('Exception ignored in ...', 'Event loop is closed'); the failure
    itself reaches the main thread. Unraisables from anywhere else are reported as usual."""
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
        return
    frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
    if any(_BackgroundErrorFilter.SOURCES[0] in frame.filename for frame in frames):
        return
    _default(unraisable)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (``app.run(main, flags_parser=cli.parse_flags)``), ending a bad
    command line with one line and exit 1 instead of a traceback: an override naming no config
    field (with ml_collections' "did you mean"), a config file that does not load (its own
    error and where), any other flag error. Help flags still print help and exit 0."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - whatever parsing raises, the command line is at fault
        sys.exit(f"error: {flag_error(e, argv)}")


def flag_error(error: Exception, argv: list[str]) -> str:
    """One line for an exception raised while parsing ``argv``."""
    text = str(error)
    if isinstance(error, (AttributeError, KeyError)):  # ml_collections: --config.a.b=... names no field
        field = re.search(r"'(\w+)\\?'", text)
        name = field.group(1) if field else text.strip("'\"")
        hint = re.search(r'Did you mean "([^"]+)"', text)
        given = next((a.split("=", 1)[0] for a in argv[1:] if re.search(rf"\.{name}(\.|=|$)", a.split("=", 1)[0])),
                     f"--config...{name}")
        return f"{given}: the config has no field {name!r}" + (f"; did you mean {hint.group(1)!r}?" if hint else "")
    if isinstance(error, SyntaxError):  # a config file that does not compile
        return f"{error.filename}, line {error.lineno}: {type(error).__name__}: {error.msg}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback (most recent call last):" in text:  # a config file's get_config raised
        places = re.findall(r'File "([^"]+)", line (\d+)', text)
        where = next((f"{f}, line {n}: " for f, n in reversed(places) if "site-packages" not in f), "")
        flag = lines[0].split(": Error whilst parsing config file")[0]
        return f"{flag}: {where}{lines[-1]}"
    return " ".join(lines)


def start() -> None:
    """Console log level, then (with --distributed) joins the multi-process job; says which
    devices and processes the job has."""
    quiet_library_logs()
    manual = [f"--{n}" for n in ("coordinator_address", "num_processes", "process_id") if flags.FLAGS[n].present]
    if not _DISTRIBUTED.value:
        if manual:
            raise ValueError(f"{', '.join(manual)} given without --distributed")
        _log_devices()
        return
    distributed.initialize(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
        heartbeat_timeout_seconds=_HEARTBEAT.value,
    )
    per_process = {"process_id", "coordinator_address"}
    command = [line for line in flags.FLAGS.flags_into_string().splitlines()
               if line.lstrip("-").split("=", 1)[0] not in per_process]
    distributed.check_same_everywhere({
        "--num_processes": str(_NUM_PROCESSES.value if _NUM_PROCESSES.value is not None
                               else os.environ.get(distributed.ENV_NUM_PROCESSES, "(auto-detected)")),
        "command line (flags and config)": " ".join(command),
    })
    if not distributed.is_chief():
        # Results are the chief's to print; the others keep warnings and errors (stderr).
        if logging.get_verbosity() > logging.WARNING:
            logging.set_verbosity(logging.WARNING)
        sys.stdout = open(os.devnull, "w")
    _log_devices()


def _log_devices() -> None:
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    logging.info("devices: %d x %s (%s) in %d process(es); this is process %d with %d local device(s)",
                 len(devices), devices[0].platform, ", ".join(kinds), jax.process_count(), jax.process_index(),
                 jax.local_device_count())


def check_finished(workdir, *, allow_unfinished: bool) -> None:
    """Predict and export use finished runs: an unfinished one (stopped by train.stop_at_step,
    a preemption or a crash) is refused with one line, or with --allow_unfinished used with a
    warning; its outputs say so (run_finished false)."""
    status = run_dir.training_status(workdir)
    if status["run_finished"]:
        return
    where = f"{workdir} is an unfinished run ({status['trained_steps']} of {status['total_steps']} steps trained)"
    if not allow_unfinished:
        raise errors.UnfinishedRunError(f"{where}: finish its training (rerun its command) or pass "
                                        "--allow_unfinished to use it anyway")
    logging.warning("%s: used anyway (--allow_unfinished); the output is marked run_finished false", where)


def echo_run(workdir) -> None:
    """Logs (INFO) which trained run an evaluation, prediction or export uses."""
    info = run_dir.load_info(workdir)
    logging.info("run folder %s: %s on leads %s, %s steps, trained on %s (folds %s)", workdir, info.get("method"),
                 ",".join(info.get("leads", [])), info.get("total_steps"), info.get("data_dir"),
                 info.get("folds") or "of the shards")


def config_help(config_file: str | pathlib.Path, config) -> str:
    """Every field of ``config`` with its value and the comment beside (or above) its line in
    ``config_file`` and the default config it inherits: what ``--config_help`` prints."""
    from experiments.configs import default as default_module

    comments: dict[str, str] = {}
    for source in (pathlib.Path(default_module.__file__), pathlib.Path(config_file)):
        above: list[str] = []
        for line in source.read_text().splitlines():
            text = line.strip()
            if text.startswith("#"):
                above.append(text.lstrip("# "))
                continue
            match = re.match(r"config\.([\w.]+)\s*=\s*[^#]*(?:#\s*(.*))?$", text)
            if match and not match.group(1).endswith(")"):
                note = match.group(2) or " ".join(above)
                if note:
                    comments[match.group(1)] = note
            above = []
    rows = hyper.flatten(config)
    width = max(len(k) for k in rows) + 2
    lines = [f"Config fields of {config_file} (override any with --config.<field>=<value>):", ""]
    for key, value in rows.items():
        lines.append(f"  {key:<{width}}{value!r:<24} {comments.get(key, '')}".rstrip())
    return "\n".join(lines)


def echo_config(config, defaults) -> None:
    """Logs (INFO) the fields of ``config`` that differ from ``defaults``: what this run changed."""
    old, new = hyper.flatten(defaults), hyper.flatten(config)
    changed = {k: v for k, v in new.items() if old.get(k, object()) != v}
    logging.info("config (fields that differ from the defaults): %s",
                 ", ".join(f"{k}={v!r}" for k, v in sorted(changed.items())) or "none")


def multi_host_args() -> list[str]:
    """This invocation's multi-host flags (not --process_id: it differs per host), for the
    commands a runner prints for a scheduler to start on every host."""
    if not _DISTRIBUTED.value:
        return []
    args = ["--distributed"]
    for name in MULTI_HOST_FLAGS[1:]:
        if flags.FLAGS[name].present:
            args.append(f"--{name}={flags.FLAGS[name].value}")
    return args


def print_report(path) -> None:
    """A runner's report and where it is (the chief's; other processes have none)."""
    if distributed.is_chief():
        print(path.read_text())
        print(f"report: {path}")


@contextlib.contextmanager
def exit_on_known_errors():
    """Exit 0 after a preemption (checkpoint saved, the same command continues);
    exit 1 with a one-line message for bad input, a diverged or an unfinished run.
    With several processes, all of them wait for each other before a normal exit."""
    try:
        yield
        distributed.barrier("entry-point-done")
    except errors.TrainingPreempted as e:
        print(e, file=sys.stderr)
        sys.exit(0)
    except jax.errors.JaxRuntimeError as e:
        if not distributed.multi_process():
            raise
        # A collective failed: another process died or lost its host (kill -9, OOM, reboot).
        first_line = str(e).strip().splitlines()[0][:300]
        print(
            f"error: process {jax.process_index()} of {jax.process_count()} lost contact with the job "
            f"({first_line}); stopping. Rerun the same command on every host: training resumes "
            "from the last complete checkpoint.",
            file=sys.stderr,
            flush=True,
        )
        # Not sys.exit: jax's exit-time shutdown barrier would wait for the dead process
        # until the heartbeat timeout and then abort with a stack dump.
        os._exit(1)
    except KNOWN_ERRORS as e:
        if logging.get_verbosity() >= logging.DEBUG:
            traceback.print_exc()
        print(f"error: {describe(e)}", file=sys.stderr)
        sys.exit(1)


def describe(error: BaseException) -> str:
    """One line: an OSError as 'PATH: problem' (read-only folder, disk full, ...)."""
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError) and error.strerror:
        where = error.filename or "writing the output"
        return f"{where}: {error.strerror}" + (f" (and {error.filename2})" if error.filename2 else "")
    return str(error)
