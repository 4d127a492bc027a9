"""A run folder's bookkeeping: its files, its config, whether it finished, who writes it.

A run folder (``--workdir`` of one training) holds:

| file | written | what |
|---|---|---|
| ``config.json`` | at every (re)start | the full config (``config_hash`` keys runs) |
| ``run_info.json`` | at every (re)start | labels, leads, crop, data dir, steps, devices, hash |
| ``metrics.jsonl`` | at log steps | one JSON row per log step / validation |
| ``checkpoints/<step>/`` ``best/<step>/`` | epoch ends, stops | orbax (``mvkt.checkpoints``) |
| ``eval_<split>.json`` ``scores_<split>.npz`` | by evaluation | ``mvkt.evaluate`` |
| ``.lock`` | while a process writes | the writer's host, pid and command |

Only one process (the chief of one job) writes a run folder at a time: ``RunLock``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import pathlib
import socket
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from mvkt import checkpoints as ckpt_lib
from mvkt import distributed
from mvkt import models
from mvkt import parallel as parallel_lib
from mvkt import process
from mvkt import run_config

CONFIG_FILE = "config.json"
INFO_FILE = "run_info.json"
METRICS_FILE = "metrics.jsonl"
TIMINGS_FILE = "timings.json"  # where the last training call's wall time went (mvkt.timing)
LOCK_FILE = ".lock"
CHECKPOINTS_DIR = "checkpoints"

# Fields that may change between a run and its resumption: they do not change what is trained.
RESUMABLE_CHANGES = (
    "train.stop_at_step",
    "train.log_every_steps",
    "train.keep_checkpoints",
    "train.steps_per_dispatch",  # how steps reach the devices, not what they compute
    "train.device_data_gb",
    "train.checkpoint_every_epochs",
    "eval.bootstrap_resamples",
    "eval.batch_size",
    "teacher.allow_unfinished",
)


class RunLockedError(RuntimeError):
    """Another live process writes this run folder."""


def config_hash(config: ml_collections.ConfigDict) -> str:
    return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:12]


def _read_json(path: pathlib.Path, what: str) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {path.parent} a training run folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: damaged {what} ({e}); restore it or use a new run folder") from None


def check_run_files(workdir: str | pathlib.Path) -> None:
    """Raises, naming the file, when a run folder's config.json or run_info.json is missing or
    damaged: before anything reads the run's checkpoints or its progress."""
    load_config(workdir)
    load_info(workdir)


def check_resume_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
    """Refuses to resume a run under a config that would train something else. Both sides are
    compared in today's layout (``run_config.training_fields``), so folders written before
    ``config.teacher`` resume under today's commands."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.exists():
        return
    old = run_config.training_fields(_read_json(path, "config"))
    new = run_config.training_fields(json.loads(config.to_json()))
    # A field added to the config after the run started, at its "off" value (""/False/0), changes nothing.
    changed = sorted(
        k for k in set(old) | set(new)
        if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k) and not (k not in old and not new.get(k))
    )
    if changed:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ValueError(
            f"{workdir} holds a run with a different config ({details}); "
            "use a new --workdir (or restore the original settings to resume it)"
        )


def load_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """A run's config in today's layout (``run_config.upgrade`` for older folders)."""
    return ml_collections.ConfigDict(run_config.upgrade(_read_json(pathlib.Path(workdir) / CONFIG_FILE, "config")))


def load_info(workdir: str | pathlib.Path) -> dict:
    return _read_json(pathlib.Path(workdir) / INFO_FILE, "run info")


def write_config_and_info(workdir: pathlib.Path, config: ml_collections.ConfigDict, info: dict) -> None:
    """Chief only, atomically."""
    distributed.write_text(workdir / CONFIG_FILE, config.to_json(indent=2, sort_keys=True))
    distributed.write_text(workdir / INFO_FILE, json.dumps(info, indent=2))


def write_timings(workdir: pathlib.Path, report: dict) -> None:
    """Chief only, atomically: ``timing.Phases.report`` of the last training call."""
    distributed.write_text(workdir / TIMINGS_FILE, json.dumps(report, indent=2))


def run_info(config: ml_collections.ConfigDict, *, train_split, folds: dict | None, crop_length: int,
             steps_per_epoch: int, num_devices: int) -> dict:
    """``run_info.json`` of a run starting now: everything inference needs, so that the run
    folder works without its shards, and what the run trains on."""
    total_steps = int(config.train.epochs) * steps_per_epoch
    return {
        "label_names": list(train_split.label_names),
        "leads": run_config.trained_leads(config),
        "crop_length": crop_length,
        "sampling_rate": train_split.sampling_rate,
        "data_dir": str(pathlib.Path(config.data.dir).absolute()),
        "folds": folds,  # None: the shards' own train/val/test splits
        "method": config.method,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "num_devices": num_devices,
        "num_processes": jax.process_count(),
        "config_hash": config_hash(config),
        "preprocessing": preprocessing_of(train_split.manifest),
        "inference": {
            "window": crop_length,
            "stride": max(int(crop_length * config.data.eval_stride_fraction), 1),
            "aggregate": config.eval.aggregate,
        },
        "provenance": provenance(),
    }


def preprocessing_of(manifest: dict) -> dict:
    """What a raw record needs before the net sees it, from the shards' manifest: copied
    into ``run_info.json`` so that a run can predict after its shards are gone."""
    prep = manifest["preprocessing"]
    return {
        "sampling_rate": int(manifest["sampling_rate"]),
        "source_sampling_rates": prep.get("source_sampling_rates"),
        "resampling": prep.get("resampling"),
        "band_pass": prep.get("band_pass"),
        "band_pass_filter": prep.get("band_pass_filter"),
        "standardization": prep["standardization"],
        "dataset": manifest.get("dataset"),
        "task": manifest.get("task"),
    }


def provenance() -> dict:
    """Where a run came from: code version, packages, devices, command line."""
    import importlib.metadata
    import platform
    import subprocess

    repo = pathlib.Path(__file__).resolve().parents[1]
    commit = dirty = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        if commit:
            dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                        capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    packages = {}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml_collections"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "packages": packages,
        "python": platform.python_version(),
        "devices": [str(d) for d in jax.devices()],
        "num_processes": jax.process_count(),
        "command": " ".join(sys.argv),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def checkpoint_steps(workdir: str | pathlib.Path) -> list[int]:
    """Steps of the complete checkpoints, ascending (orbax renames ``<step>.orbax-...-tmp``
    folders to ``<step>`` only once a save is complete)."""
    folder = pathlib.Path(workdir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def trained_steps(workdir: str | pathlib.Path) -> tuple[int, int | None]:
    """(step of the newest complete checkpoint or 0, total steps of the run or None)."""
    workdir = pathlib.Path(workdir)
    steps = checkpoint_steps(workdir)
    total = load_info(workdir)["total_steps"] if (workdir / INFO_FILE).exists() else None
    return (steps[-1] if steps else 0), total


def training_status(workdir: str | pathlib.Path) -> dict:
    """How far a run got: ``{"run_finished", "trained_steps", "total_steps"}`` (evaluations,
    predictions and exports of an unfinished run carry it)."""
    done, total = trained_steps(workdir)
    return {"run_finished": is_finished(workdir), "trained_steps": done, "total_steps": total}


def is_finished(workdir: str | pathlib.Path) -> bool:
    """Training reached its last step and that checkpoint is complete on disk."""
    workdir = pathlib.Path(workdir)
    if not (workdir / INFO_FILE).exists():
        return False
    total = load_info(workdir)["total_steps"]
    return (workdir / CHECKPOINTS_DIR / str(total)).is_dir()


def metric_rows(workdir: str | pathlib.Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` ([] when there is none); a damaged line (a process
    killed while writing it) is skipped with a warning."""
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logging.warning("%s line %d is damaged and skipped: %r", path, number, line[:80])
    return rows


TENSORBOARD_DIR = "tensorboard"


def tensorboard_tag(key: str) -> str:
    """``metrics.jsonl`` key -> TensorBoard tag: ``val_macro_auc`` -> ``val/macro_auc``,
    ``val_auc/CD`` -> ``val/auc/CD``, ``loss_clt`` -> ``train/loss_clt``."""
    return f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"


def import_tensorboardx():
    """tensorboardX, imported without PyTorch.

    tensorboardX's writer imports torch whenever it is installed, only to accept torch
    tensors; mvkt logs Python floats. Where torch is installed (most researchers' machines)
    that import cost every training run 1.2-1.9 s and 180 MB (tensorboardX 2.6.5, torch
    2.13.0, 2-core CPU machine; 0.09 s without torch). Called by the chief of a training run
    only, so that predict, export and evaluate, which import this module, do not pay for
    tensorboardX either.
    """
    if "torch" in sys.modules or "tensorboardX" in sys.modules:  # already paid, or in use
        import tensorboardX  # noqa: PLC0415

        return tensorboardX
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
    try:
        import tensorboardX  # noqa: PLC0415
    finally:
        del sys.modules["torch"]
    return tensorboardX


class MetricsLog:
    """``metrics.jsonl`` (the machine-readable record) and TensorBoard event files in
    ``tensorboard/`` with the same values; rows past a resumed step are dropped from both.

    On resume it warns when the log is missing or ends before the checkpoint it resumes
    from: those rows are lost (the curves have a hole), training itself is unaffected. The
    event files are then rewritten from the kept rows, so a resumed run continues the same
    curves without points logged twice. Only the chief writes (``enabled``).
    """

    def __init__(self, workdir: pathlib.Path, *, resume_step: int, enabled: bool):
        self.path = pathlib.Path(workdir) / METRICS_FILE
        self.enabled = enabled
        self._events = None
        if not enabled:
            return
        existed = self.path.exists()
        rows = metric_rows(workdir)
        last = max((r.get("step", 0) for r in rows), default=0)
        if resume_step > 0 and not existed:
            logging.warning(
                "%s is missing: the run resumes at step %d, the rows of steps 1-%d are lost",
                self.path,
                resume_step,
                resume_step,
            )
        elif resume_step > last:
            logging.warning(
                "%s ends at step %d but the run resumes at step %d: the rows of steps %d-%d are lost",
                self.path,
                last,
                resume_step,
                last + 1,
                resume_step,
            )
        kept = [r for r in rows if r.get("step", 0) <= resume_step]
        if existed:
            distributed.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        events = pathlib.Path(workdir) / TENSORBOARD_DIR
        for old in events.glob("events.out.tfevents.*"):
            old.unlink()
        # flush_secs: curves appear in TensorBoard within seconds, not the default 2 minutes.
        self._events = import_tensorboardx().SummaryWriter(str(events), flush_secs=10)
        for row in kept:
            self._add_events(row)

    def _add_events(self, row: dict) -> None:
        step = int(row["step"])
        for key, value in row.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)):
                self._events.add_scalar(tensorboard_tag(key), float(value), step)

    def write(self, row: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            self._add_events(row)

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None


# ----------------------------------------------------------------------------- one writer


class RunLock:
    """``<workdir>/.lock`` held by the one process that writes the run folder.

    A second writer is refused with ``RunLockedError`` naming the holder. A lock left by
    a dead process of this host is taken over (with a warning); one from another host
    cannot be checked from here: the message says how to remove it. With several
    processes only the chief holds it (one lock per job).
    """

    # A lock file still empty after this long was left by a process killed while creating it.
    EMPTY_GRACE_S = 10.0
    # How long a second process waits for a just-created lock file to be written.
    WRITE_WAIT_S = 2.0

    def __init__(self, workdir: str | pathlib.Path):
        self.workdir = pathlib.Path(workdir).absolute()
        self.path = self.workdir / LOCK_FILE
        self._held = False

    def _holder(self) -> dict | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return None  # being written, or left half-written

    def _stale(self, holder: dict | None) -> bool:
        if holder is None:
            try:
                return time.time() - self.path.stat().st_mtime > self.EMPTY_GRACE_S
            except FileNotFoundError:
                return True
        return holder.get("host") == socket.gethostname() and not process.alive(
            int(holder.get("pid", -1)), holder.get("start_time")
        )

    def acquire(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_time": process.start_time(os.getpid()),
            "since": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                # The holder writes its lock file right after creating it: give it a moment, so
                # the refusal can name it rather than "a lock file being written".
                deadline = time.monotonic() + self.WRITE_WAIT_S
                while holder is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                    holder = self._holder()
                if holder == {}:  # released meanwhile
                    continue
                if self._stale(holder):
                    logging.warning(
                        "%s: taking over the lock of a process that no longer runs (%s)",
                        self.workdir,
                        "unreadable lock file" if holder is None else f"pid {holder.get('pid')}",
                    )
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                who = (
                    "another process (lock file being written)"
                    if holder is None
                    else f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} "
                    f"({holder.get('command')})"
                )
                raise RunLockedError(
                    f"{self.workdir} is being written by {who}; one process per run folder: wait for it "
                    f"or use another --workdir (if that process is gone, delete {self.path})"
                )
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            self._held = True
            return
        raise RunLockedError(f"{self.workdir}: could not take {self.path} (it keeps changing hands)")

    def release(self) -> None:
        if self._held:
            self._held = False
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def writer(workdir: str | pathlib.Path):
    """The job's hold on ``workdir``: the chief takes ``RunLock``; every process learns
    whether it got it (a refusal ends all processes)."""
    lock = RunLock(workdir)
    distributed.on_chief(lock.acquire)
    try:
        yield
    finally:
        if distributed.is_chief():
            lock.release()


def load_trained_model(
    workdir: str | pathlib.Path, *, which: str = "best", parallel: parallel_lib.Parallelism | None = None
):
    """(model, variables, run config, run info, checkpoint meta) of a trained run.

    ``which``: ``best`` (selected on validation; what evaluation, teachers and predictions
    use) or ``latest``. Variables come back replicated over ``parallel``'s mesh.
    """
    parallel = parallel or parallel_lib.make_parallelism()
    config = load_config(workdir)
    info = load_info(workdir)
    model = models.from_config(run_config.net_config(config), len(info["label_names"]))
    sample = jnp.zeros((1, info["crop_length"], len(info["leads"])), jnp.float32)
    target = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), sample, train=False))
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=parallel.replicated), target)
    # Training saves {"params", "batch_stats"}; a registered net without BatchNorm has the latter empty.
    target = {"batch_stats": {}, **target}
    variables, meta = ckpt_lib.restore_model(workdir, model_target=target, which=which)
    return model, variables, config, info, meta
