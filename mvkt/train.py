"""The resumable training loop of one run: ``train_and_evaluate(config, workdir)``.

The library never reads flags: the config is an ``ml_collections.ConfigDict`` (every field
in ``experiments/configs/default.py``). What the loop runs comes from the modules that own
it: the state and jitted step from ``mvkt.step``, the teacher's targets from
``mvkt.teachers``, what is measured from ``mvkt.evaluators``, when things happen from
``mvkt.periodic``, the run folder's files from ``mvkt.run_dir`` and ``mvkt.checkpoints``.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
import tqdm

from mvkt import checkpoints as ckpt_lib
from mvkt import data as data_lib
from mvkt import dispatch as dispatch_lib
from mvkt import distributed
from mvkt import evaluators as evaluators_lib
from mvkt import input_pipeline
from mvkt import memory
from mvkt import parallel as parallel_lib
from mvkt import periodic
from mvkt import run_config
from mvkt import run_dir
from mvkt import step as step_lib
from mvkt import teachers
from mvkt import timing
from mvkt.errors import TrainingDivergedError, TrainingPreempted

__all__ = ["train_and_evaluate", "TrainingDivergedError", "TrainingPreempted"]


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    parallel: parallel_lib.Parallelism | None = None,
    progress: bool = True,
) -> dict:
    """Trains (or resumes) the run in ``workdir``; returns a summary dict.

    Under several processes every process calls this with the same arguments; only
    the chief writes files, and all of them return (or raise) at the same step. The
    run folder is locked for the whole call (``run_dir.RunLock``).
    """
    workdir = pathlib.Path(workdir).absolute()
    with run_dir.writer(workdir):
        return _train(config, workdir, parallel=parallel or parallel_lib.make_parallelism(), progress=progress)


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path, *, parallel: parallel_lib.Parallelism,
           progress: bool) -> dict:
    phases = timing.Phases()
    with phases("setup"):
        run = _Run.build(config, workdir, parallel, phases)
    with phases("restore"):
        state, rng, best_auc = _restore(run, run.training.state, parallel.replicate(run.rng))
    start_step = int(state.step)
    cadence = run.cadence()
    if cadence.stop_at is not None and start_step >= cadence.stop_at and start_step < run.total_steps:
        run.checkpoints.close()
        _say(run.is_chief, f"{workdir.name}: stopped at step {start_step} by train.stop_at_step={cadence.stop_at}; "
                           "nothing to train (rerun without it, or with a later one, to continue)")
        return _summary(run, start_step, best_auc, resumed_finished=False, finished=False,
                        stopped_at_step=cadence.stop_at)
    if start_step >= run.total_steps:
        run.checkpoints.close()
        _say(run.is_chief, f"{workdir.name}: already finished ({start_step}/{run.total_steps} steps), nothing to train")
        return _summary(run, start_step, best_auc, resumed_finished=True)
    log = run_dir.MetricsLog(workdir, resume_step=start_step, enabled=run.is_chief)
    # Nobody reads the run folder's files before the chief has (re)written them.
    distributed.barrier(f"run-files-written:{workdir}:{start_step}")
    if run.source is not None:
        run.source.start(run.loader, batch_size=run.batch_size, parallel=parallel)
    evaluators = evaluators_lib.build(list(config.eval.evaluators), run.eval_context())
    meter = _Meter(run, log, start_step)
    preempted = False
    bar = _progress_bar(progress and run.is_chief, start_step, run.total_steps, workdir.name)
    dispatcher = run.dispatcher
    prefetch = input_pipeline.Prefetcher(dispatcher.produce, dispatcher.chunks(start_step, run.total_steps, cadence))
    calls = iter(prefetch)
    done = start_step
    release_compiler_heap = memory.ReleaseAfterFirst()
    with distributed.StopRequest() as stop:
        try:
            while True:
                with phases("input"):
                    item = next(calls, None)
                if item is None:
                    break
                (first, count), feed = item
                # A program's first call traces and compiles it (the K-step one, then the one-step
                # one before a cadence point): compilation, not host work per step.
                with phases("compile" if dispatcher.first_call(feed) else "dispatch"):
                    state, step_metrics = dispatcher(state, feed, rng)
                meter.pending.append((step_metrics, count))
                done = first + count
                bar.update(count)
                # Log points depend only on the step, so every process reaches the same ones;
                # a SIGTERM on any process is acted on at the next one, by all of them.
                if not cadence.log_point(done):
                    continue
                with phases("device_wait"):
                    jax.block_until_ready(step_metrics)
                preempted = distributed.any_process(stop.requested)
                must_stop = preempted or cadence.planned_stop(done)
                with phases("logging"):
                    means = meter.read_and_log(done, bar)
                    release_compiler_heap("step")
                if cadence.epoch_end(done):
                    epoch = done // run.steps_per_epoch
                    results = None
                    if cadence.eval_point(done):
                        with phases("validation"):
                            results = evaluators_lib.evaluate(evaluators, state.model_items())
                            release_compiler_heap("validation")
                        _log_validation(run, log, done, epoch, means, results)
                    improved, best_auc = _selection(results, best_auc)
                    latest = must_stop or done == run.total_steps or cadence.checkpoint_point(done)
                    if latest or improved:
                        with phases("checkpointing"):
                            run.save(state, rng, done, epoch, results, best_auc, improved, latest=latest)
                elif must_stop:
                    with phases("checkpointing"):
                        run.save(state, rng, done, cadence.epoch(done), None, best_auc, False)
                if must_stop:
                    _say(run.is_chief, f"{workdir.name}: checkpoint saved, stopped at step {done}/{run.total_steps} "
                                       f"({'SIGTERM' if preempted else 'train.stop_at_step'}); rerun to continue")
                    break
        finally:
            prefetch.close()
            bar.close()
            log.close()
            with phases("checkpoint_wait"):
                run.checkpoints.wait()
            run.checkpoints.close()
            run_dir.write_timings(workdir, phases.report(
                start_step=start_step, end_step=done, batch_size=run.batch_size,
                steps_per_dispatch=dispatcher.k, training_data="devices" if dispatcher.on_device else "host"))
        # A SIGTERM after the last log point: all processes still leave the same way.
        preempted = distributed.any_process(preempted or stop.requested)
    if preempted:
        raise TrainingPreempted(f"{workdir}: SIGTERM at step {int(state.step)}/{run.total_steps}; "
                                "checkpoint saved, rerun the same command to continue")
    final_step = int(state.step)
    return _summary(run, final_step, best_auc, resumed_finished=False, finished=final_step >= run.total_steps)


def _summary(run: "_Run", step: int, best_auc: float, **status) -> dict:
    """What ``train_and_evaluate`` returns: where the run stands and how this call ended."""
    return {"workdir": str(run.workdir), "step": step, "total_steps": run.total_steps,
            "best_val_macro_auc": best_auc, **status}


@dataclasses.dataclass
class _Run:
    """One run's fixed parts: data, loader, run info, target source, compiled step, checkpoints."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    parallel: parallel_lib.Parallelism
    train_split: data_lib.Split
    val_split: data_lib.Split
    loader: input_pipeline.TrainBatches
    info: dict
    source: teachers.TargetSource | None
    training: step_lib.Training
    dispatcher: dispatch_lib.Dispatcher
    rng: jax.Array
    checkpoints: ckpt_lib.RunCheckpoints
    is_chief: bool

    @property
    def batch_size(self) -> int:
        return int(self.config.train.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return self.loader.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.info["total_steps"]

    @classmethod
    def build(cls, config: ml_collections.ConfigDict, workdir: pathlib.Path,
              parallel: parallel_lib.Parallelism, phases: timing.Phases) -> "_Run":
        is_chief = distributed.is_chief()
        run_config.validate(config)
        loss_spec = step_lib.LossSpec.from_config(config)
        # Damaged shards are found before training, not as a diverged loss hours later; each
        # host checks its own copy (hashed once per change of the files).
        with phases("verify_shards"):
            distributed.on_every_process(data_lib.verify_shards, config.data.dir,
                                         cache_dir=data_lib.default_cache_dir())
        if config.teacher.cache and config.data.random_crop and not config.teacher.cache_stride_seconds:
            raise ValueError(
                "config.teacher.cache=True with random crops needs a grid of crop starts: set "
                "--config.teacher.cache_stride_seconds (e.g. 0.25), or --config.data.random_crop=False")
        folds = run_config.fold_splits(config.data)
        train_split = data_lib.open_split(config.data.dir, "train", folds=folds)
        val_split = data_lib.open_split(config.data.dir, "val", folds=folds)
        label_names = list(train_split.label_names)
        crop_length = int(round(config.data.crop_seconds * train_split.sampling_rate))
        run_config.check_crop(config, crop_length, int(np.max(train_split.lengths)), train_split.sampling_rate)
        batch_size = int(config.train.batch_size)
        loader = input_pipeline.TrainBatches(
            train_split, global_batch_size=batch_size, crop_length=crop_length,
            random_crop=bool(config.data.random_crop), seed=int(config.seed),
            host_rows=parallel.host_slice(batch_size),
            # Cached teachers see random crops on a grid, so every crop's outputs can be precomputed.
            crop_grid=(max(int(round(config.teacher.cache_stride_seconds * train_split.sampling_rate)), 1)
                       if config.teacher.cache and config.data.random_crop else None))
        info = run_dir.run_info(config, train_split=train_split, folds=folds, crop_length=crop_length,
                                steps_per_epoch=loader.steps_per_epoch, num_devices=parallel.num_devices)
        _say(is_chief, f"run folder {workdir}: {config.method} on leads {','.join(info['leads'])}, "
                       f"{info['total_steps']} steps ({int(config.train.epochs)} epochs x {loader.steps_per_epoch}), "
                       f"global batch {batch_size} on {parallel.num_devices} device(s) in {jax.process_count()} "
                       "process(es)")
        _say(is_chief, f"data {info['data_dir']}: {len(train_split)} training and {len(val_split)} validation records"
                       + (f" (folds {folds['train']} / {folds['val']})" if folds else ""))
        # Every process checks the old config before the chief replaces it.
        if (workdir / run_dir.CHECKPOINTS_DIR).is_dir():
            run_dir.check_resume_config(workdir, config)
        distributed.barrier(f"config-checked:{workdir}")
        run_dir.write_config_and_info(workdir, config, info)
        source = teachers.provide(config, needs_teacher=loss_spec.needs_teacher, label_names=label_names,
                                  folds=folds, parallel=parallel)
        init_rng, rng = jax.random.split(jax.random.PRNGKey(int(config.seed)))
        training = step_lib.build_training(
            config, num_classes=len(label_names), crop_length=crop_length, total_steps=info["total_steps"],
            parallel=parallel, rng=init_rng, train_labels=train_split.y,
            teacher=source.teacher if source else None, teacher_leads=source.leads if source else None,
            label_names=label_names, sampling_rate=train_split.sampling_rate,
            band_pass=(train_split.manifest.get("preprocessing") or {}).get("band_pass"))
        on_device, why = dispatch_lib.choose_device_data(train_split, crop_length=crop_length,
                                                         device_data_gb=float(config.train.device_data_gb))
        with phases("device_data"):
            device_data = (dispatch_lib.DeviceData.place(train_split, crop_length=crop_length, parallel=parallel)
                           if on_device else None)
        dispatcher = dispatch_lib.Dispatcher(
            update_fn=training.update_fn, host_update=training.update, loader=loader, source=source,
            parallel=parallel, steps_per_dispatch=int(config.train.steps_per_dispatch), device_data=device_data)
        _say(is_chief, f"input: {why}, {dispatcher.k} step(s) per dispatch")
        checkpoints = ckpt_lib.RunCheckpoints(workdir, keep=int(config.train.keep_checkpoints))
        return cls(config, workdir, parallel, train_split, val_split, loader, info, source, training, dispatcher,
                   rng, checkpoints, is_chief)

    def cadence(self) -> periodic.Cadence:
        train = self.config.train
        return periodic.Cadence(steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
                                log_every=int(train.log_every_steps),
                                eval_every_epochs=int(self.config.eval.every_epochs),
                                checkpoint_every_epochs=int(train.checkpoint_every_epochs),
                                stop_at=int(train.stop_at_step) if train.stop_at_step else None)

    def eval_context(self) -> evaluators_lib.Context:
        return evaluators_lib.Context(
            config=self.config, workdir=self.workdir, model=self.training.model,
            lead_index=self.training.student_leads, parallel=self.parallel, val_split=self.val_split,
            label_names=list(self.info["label_names"]), window=self.info["inference"]["window"],
            stride=self.info["inference"]["stride"])

    def save(self, state, rng, step: int, epoch: float, results: dict | None, best_auc: float, best: bool,
             latest: bool = True) -> None:
        meta = {"step": step, "epoch": epoch,
                "val_macro_auc": (results or {}).get(evaluators_lib.SELECTION_METRIC),
                "best_val_macro_auc": best_auc, "config_hash": self.info["config_hash"],
                "label_names": self.info["label_names"], "leads": self.info["leads"]}
        self.checkpoints.save(step, model=state.model_items(), train=state.train_items(rng), meta=meta, best=best,
                              latest=latest)


def _restore(run: _Run, state, rng) -> tuple:
    """The latest checkpoint's state and rng and the best validation AUC so far, or the
    fresh ones."""
    checkpoints = run.checkpoints
    if checkpoints.latest_step() is None:
        return state, rng, -math.inf
    try:
        model_part, train_part, _ = checkpoints.restore_latest(model=state.model_items(),
                                                               train=state.train_items(rng))
    except BaseException:
        # Release the managers (and orbax's pending reads of the damaged steps) here, as the
        # training loop's `finally` does, not at interpreter exit after the error is printed.
        checkpoints.close()
        raise
    state, rng = state.restored(model_part, train_part), train_part["rng"]
    best = checkpoints.best_meta()
    best_auc = best["val_macro_auc"] if best and best.get("val_macro_auc") is not None else -math.inf
    _say(run.is_chief, f"{run.workdir.name}: resumed at step {int(state.step)}/{run.total_steps}")
    return state, rng, best_auc


def _selection(results: dict | None, best_auc: float) -> tuple[bool, float]:
    """(is this checkpoint the best, the best validation AUC). An undefined validation AUC
    cannot select: the latest checkpoint stands in as best until a defined one exists (tiny
    validation folds, e.g. of the embedded sample)."""
    validated = results is not None
    val_auc = (results or {}).get(evaluators_lib.SELECTION_METRIC)
    improved = (val_auc is not None and val_auc > best_auc) or (validated and val_auc is None and best_auc == -math.inf)
    return improved, val_auc if improved and val_auc is not None else best_auc


def _log_validation(run: _Run, log: run_dir.MetricsLog, done: int, epoch: int, means: dict, results: dict) -> None:
    log.write({"step": done, "epoch": epoch, **results})
    val_auc = results.get(evaluators_lib.SELECTION_METRIC)
    _say(run.is_chief, f"{run.workdir.name} epoch {epoch}: loss {means['loss']:.4f} val macro-AUC "
                       + ("undefined" if val_auc is None else f"{val_auc:.4f}"))


class _Meter:
    """The step metrics since the last log point, read on the host only at log points."""

    def __init__(self, run: _Run, log: run_dir.MetricsLog, start_step: int):
        self.run, self.log, self.pending = run, log, []
        self.last_time, self.last_step = time.perf_counter(), start_step

    def read_and_log(self, done: int, bar) -> dict:
        run = self.run
        means = _means(self.pending)
        self.pending.clear()
        _check_finite({k: v for k, v in means.items() if k.startswith("loss")}, step=done, since=self.last_step,
                      loader=run.loader, data_dir=str(run.config.data.dir))
        now = time.perf_counter()
        seconds_per_step = (now - self.last_time) / (done - self.last_step)
        self.last_time, self.last_step = now, done
        row = {"step": done, "epoch": done / run.steps_per_epoch, **means, "step_time_s": seconds_per_step,
               "samples_per_s": run.batch_size / seconds_per_step}
        self.log.write(row)
        if bar.disable:  # no progress bar (not a terminal, or progress=False): a log line instead
            terms = ", ".join(f"{k[5:]} {v:.4f}" for k, v in means.items() if k.startswith("loss_"))
            _say(run.is_chief, f"{run.workdir.name} step {done}/{run.total_steps}: loss {means['loss']:.4f}"
                               + (f" ({terms})" if terms else "") + f", {row['samples_per_s']:.0f} samples/s")
        bar.set_postfix(loss=f"{means['loss']:.4f}", sps=f"{row['samples_per_s']:.0f}")
        return means


def _means(pending: list[tuple[dict, int]]) -> dict[str, float]:
    """The mean of each metric over the steps of the calls since the last log point. One-step
    calls: averaged on the device, as always (the logged numbers stay bitwise those of earlier
    runs). With K-step calls: all values fetched at once and averaged on the host (no eager
    device op, which would compile for every new number of calls)."""
    metrics = [m for m, _ in pending]
    if all(v.ndim == 0 for m in metrics for v in m.values()):
        return {k: float(v) for k, v in jax.device_get(
            jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *metrics)).items()}
    fetched = jax.device_get(metrics)
    return {k: float(np.mean(np.concatenate([np.atleast_1d(m[k])[:count] for m, (_, count) in zip(fetched, pending)]),
                             dtype=np.float32)) for k in fetched[0]}


def _check_finite(values: dict, *, step: int, since: int, loader: input_pipeline.TrainBatches,
                  data_dir: str) -> None:
    """Raises ``TrainingDivergedError`` for a non-finite loss, saying whether the data of
    the steps since the last check was to blame or the optimisation diverged."""
    bad = {k: v for k, v in values.items() if not np.isfinite(v)}
    if not bad:
        return
    records = input_pipeline.bad_records(loader, range(since, step))
    if records:
        shown = ", ".join(records[:10]) + (f" and {len(records) - 10} more" if len(records) > 10 else "")
        raise TrainingDivergedError(
            f"non-finite loss at step {step}: {bad}. The training batches of steps {since + 1}-{step} hold "
            f"non-finite or absurd (|x| > {input_pipeline.ABSURD_SAMPLE:g}) samples in record(s) {shown} of {data_dir}: "
            f"check the shards (python -c \"from mvkt import data; data.verify_shards('{data_dir}')\") "
            "and prepare them again. The last good checkpoint is kept."
        )
    raise TrainingDivergedError(
        f"non-finite loss at step {step}: {bad}; the training batches of steps {since + 1}-{step} are "
        "finite, so the optimisation diverged. The run stopped; the last good checkpoint is kept. "
        "Lower the learning rate (--config.train.learning_rate) or enable gradient clipping."
    )


def _say(enabled: bool, message: str) -> None:
    """A progress message at INFO (``--verbosity=-1`` hides it), written around the bar."""
    if enabled and logging.level_info():
        tqdm.tqdm.write(message)


def _progress_bar(enabled: bool, initial: int, total: int, name: str):
    return tqdm.tqdm(
        total=total,
        initial=initial,
        desc=name,
        unit="step",
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=1.0,
    )
