"""Where a training call's wall time goes, by phase (``timings.json`` in the run folder).

Device work is asynchronous: a dispatched step returns at once and the host waits for it
only when it reads a result. The loop therefore waits for the steps' results before it
reads metrics (``device_wait``), so that ``logging`` is the reading and writing alone;
``dispatch`` is the host's part of the calls, and ``compile`` the first call of the step
(tracing and compilation happen in that call, before anything runs). On XLA:CPU the
"device" is the same cores, and a call may run part of its work before it returns. ``benchmarks/end_to_end.py`` reads these files.
"""

from __future__ import annotations

import contextlib
import time

# In the order of a run: what the file lists, and what each phase is.
PHASES = {
    "setup": "shard verification, splits, loader, run files, teacher, state and step built",
    "verify_shards": "part of setup: the shards' hashes checked (cached after the first start)",
    "device_data": "part of setup: the training split placed on the devices",
    "restore": "the latest checkpoint restored",
    "compile": "the first call of each step program (tracing + compilation): the K-step one and the one-step one",
    "input": "the loop waiting for the next batch from the prefetch threads",
    "dispatch": "calling the jitted step (host work: it returns before the devices finish)",
    "device_wait": "waiting at log points for the dispatched steps to finish",
    "logging": "reading the metrics on the host, metrics.jsonl, TensorBoard, progress",
    "validation": "the evaluators at validation points",
    "checkpointing": "the blocking part of the checkpoint saves",
    "checkpoint_wait": "waiting for the last asynchronous saves before returning",
}


class Phases:
    """Accumulated wall seconds per phase: ``with phases("input"): ...``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        if name not in PHASES:
            raise KeyError(f"unknown phase {name!r}: one of {list(PHASES)}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def report(self, **extra) -> dict:
        """The file's content: seconds per phase, the call's wall time and what is not in a phase."""
        wall = time.perf_counter() - self.started
        top_level = sum(v for k, v in self.seconds.items() if not PHASES[k].startswith("part of"))
        return {"wall_s": wall, "phases_s": {k: self.seconds[k] for k in PHASES if k in self.seconds},
                "other_s": wall - top_level, "phase_meanings": PHASES, **extra}
