"""Several processes (one per host) training as one job: start-up, who writes, agreement.

Every process runs the same program on its own slice of each global batch (see
``mvkt.parallel``). Three rules keep them in step:

- **One writer.** Only process 0 (the chief) writes files (run folder, evaluations,
  reports); the others read them only after a ``barrier``. ``write_text`` writes
  atomically (temporary file + rename) so a reader never sees half a file.
- **Shared decisions.** A choice that depends on files (is this run finished? is its
  evaluation cached?) is made by the chief and broadcast (``chief_decides``): on a
  network filesystem two hosts can see different states of one folder, and two
  processes that choose differently would wait forever in different collectives.
- **Agreed stops.** A signal reaches one host only (a preempted machine); the trainer
  reduces its stop flag over all processes (``any_process``) at every log step, so all
  save the same step and exit together.

A process that dies (kill -9, lost host) is detected by the coordination service's
heartbeat: the survivors abort with the service's error after
``heartbeat_timeout_seconds`` instead of waiting forever in a collective.

With one process every function here is a cheap no-op, so single-host code paths are
unchanged.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import signal
import threading
from typing import IO, Callable, TypeVar

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

# The variables jax's own launchers and docs use for a manual multi-process start.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"

# jax waits 100 s by default; a dead peer should end the job well within 2 minutes.
DEFAULT_HEARTBEAT_TIMEOUT_S = 60

T = TypeVar("T")


class OtherProcessFailedError(RuntimeError):
    """Raised on the other processes when work that failed on one process (the chief's
    file writing, a host's data check) ends the job."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def initialize(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout_seconds: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
    initialization_timeout_seconds: int = 300,
) -> None:
    """``jax.distributed.initialize`` with explicit values, then ``JAX_*`` variables, then
    jax's cluster auto-detection (SLURM, Cloud TPU, Open MPI, ...) for whatever is unset.

    Must run before anything touches a device.
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    manual = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in manual) and any(v is None for v in manual):
        # jax would only say "Number of processes must be defined" (or similar) for a cluster it
        # cannot detect; name the three values and where each can come from.
        missing = [
            name
            for name, value, env in zip(
                ("--coordinator_address", "--num_processes", "--process_id"),
                manual,
                (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID),
            )
            if value is None
        ]
        given = ", ".join(
            f"{n}={v}" for n, v in zip(("coordinator", "num_processes", "process_id"), manual) if v is not None
        )
        raise ValueError(
            f"multi-process start: {given} given, but {', '.join(missing)} missing; "
            f"pass all three (flags or {ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}) "
            "or none of them to let jax detect the cluster"
        )
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is outside [0, {num_processes}) processes")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=initialization_timeout_seconds,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
    )
    logging.info(
        "process %d of %d (coordinator %s), %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        coordinator_address or "auto-detected",
        jax.local_device_count(),
        jax.device_count(),
    )


def is_chief() -> bool:
    """Process 0: the only one that writes files and prints results."""
    return jax.process_index() == 0


def multi_process() -> bool:
    return jax.process_count() > 1


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (no-op with one process).

    ``name`` must be the same on every process and unique per call site and moment
    (include the step or the folder where one site runs several times).
    """
    if multi_process():
        multihost_utils.sync_global_devices(name)


def check_same_everywhere(values: dict[str, str]) -> None:
    """Raises ValueError on every process unless all processes hold the same ``values``
    (name -> text, e.g. the command's flags), naming the first that differs (a collective:
    all must call it). Two processes started with different --num_processes or configs
    otherwise both trained, each on its own idea of the job."""
    if not multi_process():
        return
    names = sorted(values)
    digest = b"".join(hashlib.sha256(values[n].encode()).digest() for n in names)
    rows = np.asarray(multihost_utils.process_allgather(np.frombuffer(digest, np.uint8).astype(np.int32)))
    rows = rows.reshape(jax.process_count(), len(names), -1)
    for k, name in enumerate(names):
        differ = [p for p in range(len(rows)) if not np.array_equal(rows[p, k], rows[0, k])]
        if differ:
            here = f"{values[name]} here" if len(values[name]) <= 40 else "see each process's command"
            raise ValueError(f"process {differ[0]} was started with another {name} than process 0 ({here}): "
                             "every process must run the same command, only the process id differs")


def any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is true on any (a collective: all must call it)."""
    if not multi_process():
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray([bool(flag)]))))


def chief_decides(value: bool) -> bool:
    """The chief's ``value`` on every process (a collective: all must call it)."""
    if not multi_process():
        return bool(value)
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(bool(value))))


def on_chief(fn: Callable[..., T], *args, **kwargs) -> T | None:
    """``fn(*args, **kwargs)`` on the chief only (host-side work that writes files, such as
    reports); every process returns once it is done. Other processes get None.

    ``fn`` must not use collectives. If it raises, every process raises (the chief its own
    error), so a failing chief never leaves the others waiting.
    """
    return _agreed(fn, is_chief(), args, kwargs)


def on_every_process(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on every process (host-local checks, e.g. of each host's copy
    of the data); if it raises anywhere, it raises everywhere. ``fn`` must not use collectives."""
    return _agreed(fn, True, args, kwargs)


def _agreed(fn: Callable[..., T], run_here: bool, args, kwargs) -> T | None:
    result, error = None, None
    if run_here:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the others
            error = e
    if any_process(error is not None):  # the collective doubles as the barrier
        if error is not None:
            raise error
        raise OtherProcessFailedError(f"{getattr(fn, '__name__', fn)} failed on another process; see its output")
    return result


def write_file(path: str | pathlib.Path, write: Callable[[IO[bytes]], None]) -> None:
    """Atomically replaces ``path`` with what ``write(binary_file)`` writes (chief only:
    other processes do nothing); a reader never sees half a file."""
    if not is_chief():
        return
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | pathlib.Path, text: str) -> None:
    """``write_file`` for text (UTF-8)."""
    write_file(path, lambda f: f.write(text.encode()))


class StopRequest:
    """SIGTERM (preemption) -> ``requested``, which the trainer reduces with ``any_process`` at
    its next log point, so that every process saves and exits at the same step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and exiting")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
