"""Orbax checkpoints of a training run: the last N for resuming, the best for evaluation.

A run directory holds two ``ocp.CheckpointManager`` folders:
- ``checkpoints/``: the last ``keep`` saves (every epoch end, SIGTERM, planned stop).
- ``best/``: the single save with the highest validation macro-AUC.

Each save is a ``Composite`` of three items, so readers restore only what they need:
- ``model``: ``{"params", "batch_stats"}`` of the trained net (evaluation, teachers);
- ``train``: step, CLT projection heads, optimizer state, memory bank, RNG;
- ``meta``: JSON (epoch, val macro-AUC, label names, leads, config hash).
The frozen teacher is never saved here: it lives in its own run directory.
"""

from __future__ import annotations

import datetime
import errno
import logging as std_logging
import pathlib
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from mvkt import distributed


def abstract(tree: Any) -> Any:
    """Shape/dtype/sharding skeleton of a pytree of arrays, the restore target."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )


def _options(*, name: str, max_to_keep: int | None, read_only: bool) -> ocp.CheckpointManagerOptions:
    # Both managers save the same step; without their own barrier prefix their
    # cross-process barriers ("_async_write_complete.<step>", ...) collide and a
    # multi-process run hangs or aborts at its first checkpoint.
    return ocp.CheckpointManagerOptions(
        # Read-only managers get the values orbax would otherwise force with a warning each.
        max_to_keep=None if read_only else max_to_keep,
        save_interval_steps=0 if read_only else 1,
        create=not read_only,
        read_only=read_only,
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name),
    )


class _DropReadOnlyNotice(std_logging.Filter):
    """orbax warns 'Given directory is read only=...' for every read-only manager, i.e. at
    every evaluation, prediction and export: that is what was asked for, not a problem."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


std_logging.getLogger("absl").addFilter(_DropReadOnlyNotice())


class RunCheckpoints:
    """The ``checkpoints/`` and ``best/`` managers of one run directory."""

    def __init__(self, workdir: str | pathlib.Path, *, keep: int = 3, read_only: bool = False):
        workdir = pathlib.Path(workdir).absolute()
        self.workdir = workdir
        self.latest = ocp.CheckpointManager(
            workdir / "checkpoints", options=_options(name="latest", max_to_keep=keep, read_only=read_only)
        )
        self.best = ocp.CheckpointManager(
            workdir / "best", options=_options(name="best", max_to_keep=1, read_only=read_only)
        )

    @staticmethod
    def _save_args(model: Any, train: Any, meta: dict) -> ocp.args.Composite:
        return ocp.args.Composite(
            model=ocp.args.StandardSave(model),
            train=ocp.args.StandardSave(train),
            meta=ocp.args.JsonSave(meta),
        )

    def save(self, step: int, *, model: Any, train: Any, meta: dict, best: bool, latest: bool = True) -> None:
        """Asynchronous save into ``checkpoints/`` (unless ``latest`` is False) and, with ``best``,
        ``best/``. A failed write (this one, or the previous save finishing in the background)
        raises ``_write_failed``'s OSError."""
        args = self._save_args(model, train, meta)
        try:
            if latest:
                self.latest.save(step, args=args, force=True)
            if best:
                self.best.save(step, args=self._save_args(model, train, meta), force=True)
        except Exception as e:  # noqa: BLE001 - tensorstore and orbax raise many types for one cause
            raise self._write_failed(e) from None

    def _write_failed(self, error: Exception) -> OSError:
        """One line for a checkpoint that could not be written (a full disk gave a tensorstore
        OUT_OF_RANGE message), after removing the partial ``*.orbax-checkpoint-tmp`` folders
        it left, which a rerun would otherwise have to step over."""
        for manager in (self.latest, self.best):  # the other save may still be writing its folder
            try:
                manager.wait_until_finished()
            except Exception:  # noqa: BLE001 - the same cause; reported once, below
                pass
        leftovers = (self._remove_partial() if distributed.is_chief() else  # the chief removes, all name them
                     sorted(p for folder in (self.workdir / "checkpoints", self.workdir / "best")
                            for p in folder.glob("*.orbax-checkpoint-tmp*")))
        text = str(error)
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text or "os_error_code='28'" in text:
            reason = "no space left on device"
        elif getattr(error, "errno", None) == errno.EFBIG or "File too large" in text:
            reason = "file too large"
        else:
            reason = (text.strip().splitlines() or [type(error).__name__])[0][:300]
        steps = sorted({int(p.name.split(".")[0]) for p in leftovers if p.name.split(".")[0].isdigit()})
        which = f"checkpoint step {', '.join(map(str, steps))}" if steps else "a checkpoint"
        return OSError(f"{self.workdir / 'checkpoints'}: {which} could not be written ({reason}); the partial "
                       "checkpoint was removed. Free space and rerun the same command: training continues from "
                       "the last complete checkpoint")

    def _remove_partial(self, *, settle_s: float = 0.5, deadline_s: float = 10.0) -> list[pathlib.Path]:
        """Removes the ``*.orbax-checkpoint-tmp*`` folders until none reappears for ``settle_s``:
        after a failed save, orbax's writer threads of the other items may still create theirs
        (seen on a loaded machine: ``best/2.orbax-checkpoint-tmp/train...`` after the cleanup)."""
        removed: set[pathlib.Path] = set()
        start = quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < settle_s and time.monotonic() - start < deadline_s:
            found = [p for folder in (self.workdir / "checkpoints", self.workdir / "best")
                     for p in folder.glob("*.orbax-checkpoint-tmp*")]
            if found:
                quiet_since = time.monotonic()
            for path in found:
                shutil.rmtree(path, ignore_errors=True)
                removed.add(path)
            time.sleep(0.05)
        return sorted(removed)

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def restore_latest(self, *, model: Any, train: Any) -> tuple[Any, Any, dict]:
        """The newest checkpoint that restores; damaged newer ones are moved aside (warned)."""
        args = ocp.args.Composite(
            model=ocp.args.StandardRestore(abstract(model)),
            train=ocp.args.StandardRestore(abstract(train)),
            meta=ocp.args.JsonRestore(),
        )
        restored = _restore_newest_good(self.latest, args, self.workdir / "checkpoints", quarantine=True)
        return restored["model"], restored["train"], restored["meta"]

    def best_meta(self) -> dict | None:
        """Meta of the best checkpoint; None (with a warning) when there is none or it is damaged."""
        step = self.best.latest_step()
        if step is None:
            return None
        try:
            return self.best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - any damage: the next validation makes a new best
            logging.warning(
                "%s: best checkpoint step %d is damaged (%s); it is replaced at the next validation",
                self.workdir / "best",
                step,
                _short(e),
            )
            return None

    def wait(self) -> None:
        try:
            self.latest.wait_until_finished()
            self.best.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - see save
            raise self._write_failed(e) from None

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def restore_model(workdir: str | pathlib.Path, *, model_target: Any, which: str = "best") -> tuple[Any, dict]:
    """The trained net's variables and meta from a finished run directory.

    ``which`` is ``best`` (highest validation macro-AUC; what evaluation and
    teachers use) or ``latest``.
    """
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', not {which!r}")
    folder = pathlib.Path(workdir).absolute() / ("best" if which == "best" else "checkpoints")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: is {workdir} a finished training run?")
    manager = ocp.CheckpointManager(folder, options=_options(name=f"restore-{which}", max_to_keep=None, read_only=True))
    try:
        if manager.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {folder}: is {workdir} a finished training run?")
        args = ocp.args.Composite(model=ocp.args.StandardRestore(abstract(model_target)), meta=ocp.args.JsonRestore())
        hint = "Evaluate the last checkpoints instead (--checkpoint=latest)" if which == "best" else None
        restored = _restore_newest_good(manager, args, folder, quarantine=False, hint=hint)
    finally:
        manager.close()
    return restored["model"], restored["meta"]


class CheckpointError(ValueError):
    """No checkpoint of a run folder restores."""


def _short(error: BaseException) -> str:
    # tensorstore appends a repr of its whole spec after this marker: dozens of lines of nothing.
    text = " ".join(str(error).split(" See full TensorStore details")[0].split())
    return f"{type(error).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def _non_finite(tree: Any) -> list[str]:
    """Paths of floating-point leaves holding NaN/inf (a flipped byte, not a trained value)."""
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        value = np.asarray(leaf)
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            bad.append(jax.tree_util.keystr(path))
    return bad


def _restore_newest_good(manager: ocp.CheckpointManager, args: ocp.args.Composite, folder: pathlib.Path,
                         *, quarantine: bool, hint: str | None = None) -> dict:
    """Restores the newest step that reads back whole and finite, warning for each that does not.

    ``quarantine``: move damaged newer steps to ``<run>/damaged_checkpoints/`` (chief only) so
    that training can save those steps again; evaluation leaves the folder untouched.
    Every process takes the same decisions (restores are collective).
    """
    steps = sorted(manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
        error = None
        try:
            restored = manager.restore(step, args=args)
            bad = _non_finite({k: v for k, v in restored.items() if k != "meta"})
            if bad:
                error = ValueError(f"non-finite values in {', '.join(bad[:3])}")
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for damaged files
            error = e
        if not distributed.any_process(error is not None):
            if failures and quarantine:
                distributed.on_chief(_move_aside, folder, [s for s, _ in failures])
                manager.reload()
            return restored
        failures.append((step, error))
        logging.warning(
            "%s: checkpoint step %d does not restore (%s); trying the one before it",
            folder, step, _short(error) if error is not None else "failed on another process",
        )
    newest_step, newest_error = failures[0]
    detail = _short(newest_error).rstrip(".") if newest_error else "failed on another process"
    raise CheckpointError(
        f"{folder}: none of the checkpoints (steps {', '.join(map(str, steps))}) restores (step "
        f"{newest_step}: {detail}). "
        + (hint or "Move the run folder away and train again (or restore it from a backup)")
    )


def _move_aside(folder: pathlib.Path, steps: list[int]) -> None:
    target = folder.parent / "damaged_checkpoints"
    target.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for step in steps:
        destination = target / f"{folder.name}-{step}-{stamp}"
        (folder / str(step)).rename(destination)
        logging.warning("moved the damaged checkpoint %s to %s", folder / str(step), destination)
