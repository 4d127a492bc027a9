"""Where a student's targets come from: teacher runs found and validated (labels, leads,
folds, finished), ensembles, teacher assistants, cross-fitting and the teacher cache.

``provide(config, ...)`` is all the trainer asks: it returns a ``TargetSource`` (or None
for a method without a teacher) that hands the step a frozen teacher (model and
variables, applied inside the step under ``stop_gradient``) and, with a cache, per-batch
targets (``batch_targets``). Sources are looked up by ``config.teacher.source``: ``runs``
(the run folders in ``config.teacher.runs``) is built in; ``register_source`` adds others
(docs/DESIGN.md, "How to add a teacher source").
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mvkt import data as data_lib
from mvkt import inference
from mvkt import input_pipeline
from mvkt import parallel as parallel_lib
from mvkt import run_config
from mvkt import run_dir


class Member(NamedTuple):
    """One trained teacher run."""

    model: nn.Module
    variables: Any
    info: dict  # its run_info.json
    meta: dict  # its best checkpoint's meta


class Ensemble(nn.Module):
    """Several trained nets as one teacher: the mean of their logits, and the features of the
    first (feature spaces differ between nets, so they are not averaged). Variables are
    ``ensemble_variables([...])``."""

    members: Sequence[nn.Module]

    def __call__(self, x, train: bool = False):
        outputs = [member(x, train=train) for member in self.members]
        return jnp.mean(jnp.stack([logits for logits, _ in outputs]), axis=0), outputs[0][1]


def ensemble_variables(variables: Sequence[dict]) -> dict:
    """The variables of an ``Ensemble`` from its members' variables, in member order."""
    return {
        collection: {f"members_{i}": v[collection] for i, v in enumerate(variables) if collection in v}
        for collection in ("params", "batch_stats")
    }


@dataclasses.dataclass
class TargetSource:
    """What the step learns from: ``model``/``variables`` (the frozen teacher, applied in the
    step unless the batch carries cached targets) on ``leads``; ``prepare_cache``, when set,
    builds the per-batch targets once the loader exists (``start``)."""

    model: nn.Module
    variables: Any
    leads: list[str]
    description: str
    prepare_cache: Callable[..., "TeacherCache"] | None = None
    cache: "TeacherCache | None" = None

    @property
    def teacher(self) -> tuple[nn.Module, Any]:
        return self.model, self.variables

    def start(self, loader: input_pipeline.TrainBatches, *, batch_size: int,
              parallel: parallel_lib.Parallelism) -> None:
        if self.prepare_cache is not None and self.cache is None:
            self.cache = self.prepare_cache(loader, batch_size=batch_size, parallel=parallel)

    def batch_targets(self, indices: np.ndarray, starts: np.ndarray) -> dict[str, np.ndarray]:
        return {} if self.cache is None else self.cache.lookup(indices, starts)


SourceFactory = Callable[..., TargetSource]
SOURCES: dict[str, SourceFactory] = {}


def register_source(name: str, factory: SourceFactory) -> None:
    """``config.teacher.source=name`` calls ``factory(config, label_names=, folds=, parallel=)``."""
    if name in SOURCES:
        raise ValueError(f"a teacher source {name!r} exists already")
    SOURCES[name] = factory


def provide(config: ml_collections.ConfigDict, *, needs_teacher: bool, label_names: Sequence[str],
            folds: dict | None, parallel: parallel_lib.Parallelism) -> TargetSource | None:
    """The run's target source, or None when its method learns from labels alone."""
    if not needs_teacher:
        return None
    name = config.teacher.source
    if name not in SOURCES:
        raise ValueError(f"config.teacher.source={name!r}: not one of {sorted(SOURCES)}")
    return SOURCES[name](config, label_names=label_names, folds=folds, parallel=parallel)


def load_members(config: ml_collections.ConfigDict, label_names: Sequence[str],
                 parallel: parallel_lib.Parallelism) -> list[Member]:
    """Every run folder listed in ``config.teacher.runs``."""
    runs = run_config.teacher_runs(config)
    if not runs:
        raise ValueError(f"method {config.method!r} needs a trained teacher: set --config.teacher.runs")
    return [load_member(config, w, label_names, parallel) for w in runs]


def ensemble(members: list[Member], parallel: parallel_lib.Parallelism) -> Member:
    """One member as it is; several as an ``Ensemble`` (mean logits, first member's features)."""
    if len(members) == 1:
        return members[0]
    first = members[0].info
    for member in members[1:]:
        for key in ("leads", "folds", "crop_length"):
            if member.info.get(key) != first.get(key):
                raise ValueError(f"the teachers of an ensemble must share their {key}: {first.get(key)} "
                                 f"and {member.info.get(key)}")
    model = Ensemble(members=tuple(m.model for m in members))
    variables = parallel.replicate(ensemble_variables([m.variables for m in members]))
    meta = {"step": [m.meta["step"] for m in members], "val_macro_auc": [m.meta.get("val_macro_auc") for m in members]}
    return Member(model, variables, first, meta)


def _from_runs(config: ml_collections.ConfigDict, *, label_names: Sequence[str], folds: dict | None,
               parallel: parallel_lib.Parallelism) -> TargetSource:
    """The run folders of ``config.teacher.runs``: one teacher, an ensemble, or with
    ``teacher.cross_fit`` the teachers of parts of this run's training folds."""
    members = load_members(config, label_names, parallel)
    leads = members[0].info["leads"]
    lead_index = data_lib.lead_indices(leads)
    if config.teacher.cross_fit:
        seen = check_cross_fit(members, folds, config)

        def prepare(loader, *, batch_size, parallel):
            return cross_fitted_cache(members, seen, loader, batch_size=batch_size, parallel=parallel,
                                      teacher_leads=lead_index)

        first = members[0]  # for shapes only: every target comes from the cache
        return TargetSource(first.model, first.variables, leads, f"{len(members)} cross-fitted teachers", prepare)
    teacher = ensemble(members, parallel)
    if teacher.info.get("folds") != folds:
        # A teacher trained on other folds may have seen this student's validation or test records.
        raise ValueError(
            f"teacher {','.join(run_config.teacher_runs(config))} was trained on folds {teacher.info.get('folds')}, "
            f"this run uses {folds}: use the teacher of the same cross-validation round"
        )
    logging.info("teacher: %s (step %s, val macro-AUC %s)", ",".join(run_config.teacher_runs(config)),
                 teacher.meta.get("step"), teacher.meta.get("val_macro_auc"))
    prepare = None
    if config.teacher.cache:
        def prepare(loader, *, batch_size, parallel):
            return teacher_cache(teacher.model, teacher.variables, loader, batch_size=batch_size,
                                 parallel=parallel, teacher_leads=lead_index)
    return TargetSource(teacher.model, teacher.variables, leads, "teacher", prepare)


register_source("runs", _from_runs)


def load_member(config: ml_collections.ConfigDict, workdir: str, label_names: Sequence[str],
                parallel: parallel_lib.Parallelism) -> Member:
    """A finished teacher run, checked against this run's labels and leads."""
    if not pathlib.Path(workdir).is_dir():
        raise FileNotFoundError(f"teacher {workdir}: no such folder; config.teacher.runs names finished teacher "
                                "run folders")
    run_dir.check_run_files(workdir)  # a missing or damaged file by name, not as "stopped at step 0"
    if not run_dir.is_finished(workdir):
        done, total = run_dir.trained_steps(workdir)
        where = f"teacher {workdir} stopped at step {done}/{total}"
        if not config.teacher.allow_unfinished:
            raise ValueError(
                f"{where}: finish it (rerun its training command) or pass "
                "--config.teacher.allow_unfinished=true to distil from it anyway"
            )
        logging.warning("%s: distilling from it anyway (config.teacher.allow_unfinished)", where)
    model, variables, _, info, meta = run_dir.load_trained_model(workdir, which="best", parallel=parallel)
    if info["label_names"] != list(label_names):
        raise ValueError(
            f"teacher in {workdir} was trained on labels {info['label_names']}, these shards have {list(label_names)}"
        )
    student = set(run_config.trained_leads(config))
    if not student <= set(info["leads"]):
        # A teacher (or a teacher assistant on fewer leads, e.g. I, II, V2) sees what the student sees.
        raise ValueError(f"teacher in {workdir} sees leads {info['leads']}: a teacher needs all "
                         f"of the student's leads {sorted(student)}")
    return Member(model, variables, info, meta)



def check_cross_fit(members: list[Member], folds: dict | None, config: ml_collections.ConfigDict) -> list[set[int]]:
    """Each teacher's training folds; refuses teachers that saw this run's validation or test
    folds, and training folds that no teacher left out (their records would have no target)."""
    if not config.teacher.cache or len(members) < 2 or folds is None:
        raise ValueError("config.teacher.cross_fit needs --config.teacher.cache=True, two or more teachers in "
                         "--config.teacher.runs, and explicit data.{train,val,test}_folds")
    seen = []
    for member in members:
        theirs = member.info.get("folds") or {}
        if theirs.get("val") != folds["val"] or theirs.get("test") != folds["test"] or not set(
                theirs.get("train", [])) <= set(folds["train"]):
            raise ValueError(f"cross-fitted teacher folds {theirs} do not fit this run's {folds}: same val and test "
                             "folds, training folds a part of this run's")
        seen.append(set(theirs["train"]))
    uncovered = sorted(f for f in folds["train"] if all(f in s for s in seen))
    if uncovered:
        raise ValueError(f"every teacher saw fold(s) {uncovered}: their records have no cross-fitted target")
    return seen


def cross_fitted_cache(members: list[Member], seen: list[set[int]], loader: input_pipeline.TrainBatches, *, batch_size: int,
                       parallel: parallel_lib.Parallelism, teacher_leads: list[int]) -> TeacherCache:
    """Per record, the mean logits of the teachers that never trained on its fold, and the
    features of the first of them (cross-fitting: no target comes from a teacher that saw
    the record). Each teacher sees the crops standardised as its own training folds were."""
    caches = [teacher_cache(m.model, m.variables, loader, batch_size=batch_size, parallel=parallel,
                            teacher_leads=teacher_leads, standardization=m.info["preprocessing"]["standardization"])
              for m in members]
    folds = np.asarray(loader.split.folds)
    eligible = np.stack([~np.isin(folds, sorted(s)) for s in seen], axis=1).astype(np.float32)  # (N, K)
    logits = np.einsum("nk,kngc->ngc", eligible, np.stack([c.logits for c in caches])) / eligible.sum(1)[:, None, None]
    first = eligible.argmax(axis=1)
    features = np.stack([c.features for c in caches])[first, np.arange(len(folds))]
    return TeacherCache(logits.astype(caches[0].logits.dtype), features, caches[0].grid)


@dataclasses.dataclass(frozen=True)
class TeacherCache:
    """The frozen teacher's logits and features for every crop training can draw: one per
    record (deterministic crops) or one per record and grid start (random crops on a grid)."""

    logits: np.ndarray  # (N, G, C)
    features: np.ndarray  # (N, G, F)
    grid: int | None  # crop starts are multiples of this; None: one fixed crop per record

    def lookup(self, indices: np.ndarray, starts: np.ndarray) -> dict[str, np.ndarray]:
        g = np.zeros_like(indices) if self.grid is None else starts // self.grid
        return {"teacher_logits": self.logits[indices, g], "teacher_features": self.features[indices, g]}


def teacher_cache(
    teacher_model,
    teacher_variables,
    loader: input_pipeline.TrainBatches,
    *,
    batch_size: int,
    parallel: parallel_lib.Parallelism,
    teacher_leads: list[int] | None = None,
    standardization: dict | None = None,
) -> TeacherCache:
    """Teacher outputs of every crop ``loader`` can draw (its grid, or its fixed crops);
    ``teacher_leads``: positions of the teacher's leads in the 12-lead crop (default all);
    ``standardization``: the teacher's, when it was fitted on other records than the
    student's (a cross-fitted teacher trained on a part of the training folds)."""
    teacher_leads = list(range(len(data_lib.LEADS))) if teacher_leads is None else teacher_leads
    if loader.random_crop:
        indices, starts = loader.grid_crops()
    else:
        indices, starts = loader.fixed_crops()
    forward = inference.make_forward_fn(teacher_model, teacher_leads, parallel)
    logits, features = inference.predict_windows(
        forward,
        teacher_variables,
        data_lib.as_standardized(loader.split, standardization),
        record_index=indices,
        starts=starts,
        window=loader.crop_length,
        batch_size=batch_size,
        parallel=parallel,
        with_features=True,
    )
    counts = np.bincount(indices, minlength=len(loader.split))
    slot = np.arange(len(indices)) - np.repeat(np.cumsum(counts) - counts, counts)  # position within its record
    shape = (len(loader.split), int(counts.max()))
    padded_logits = np.zeros(shape + logits.shape[1:], logits.dtype)
    padded_features = np.zeros(shape + features.shape[1:], features.dtype)
    padded_logits[indices, slot], padded_features[indices, slot] = logits, features
    return TeacherCache(padded_logits, padded_features, loader.crop_grid if loader.random_crop else None)
