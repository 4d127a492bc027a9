"""Local process identity, for the folder locks of run folders (``mvkt.run_dir``) and of
data preparation (``data_prep.common``): whether a pid still runs the process that took a
lock. Standard library only, so that data preparation does not import JAX for it."""

from __future__ import annotations

import os
import pathlib


def start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a reused pid from the original), if known."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def alive(pid: int, started: str | None = None) -> bool:
    """``pid`` exists (and, when ``started`` is given and known, is the process started then)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return started is None or start_time(pid) in (None, started)
