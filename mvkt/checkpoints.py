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

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


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
        max_to_keep=max_to_keep,
        create=not read_only,
        read_only=read_only,
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name),
    )


class RunCheckpoints:
    """The ``checkpoints/`` and ``best/`` managers of one run directory."""

    def __init__(self, workdir: str | pathlib.Path, *, keep: int = 3, read_only: bool = False):
        workdir = pathlib.Path(workdir).absolute()
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

    def save(self, step: int, *, model: Any, train: Any, meta: dict, best: bool) -> None:
        """Asynchronous save; ``best`` also replaces the best checkpoint."""
        args = self._save_args(model, train, meta)
        self.latest.save(step, args=args, force=True)
        if best:
            self.best.save(step, args=self._save_args(model, train, meta), force=True)

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def restore_latest(self, *, model: Any, train: Any) -> tuple[Any, Any, dict]:
        step = self.latest.latest_step()
        restored = self.latest.restore(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardRestore(abstract(model)),
                train=ocp.args.StandardRestore(abstract(train)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored["model"], restored["train"], restored["meta"]

    def best_meta(self) -> dict | None:
        step = self.best.latest_step()
        if step is None:
            return None
        return self.best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

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
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {folder}")
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardRestore(abstract(model_target)), meta=ocp.args.JsonRestore()
            ),
        )
    finally:
        manager.close()
    return restored["model"], restored["meta"]
