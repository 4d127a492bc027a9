"""Training of teachers and students: state, the pure ``update_fn``, and the resumable loop.

The library never reads flags: ``train_and_evaluate(config, workdir)`` takes an
``ml_collections.ConfigDict`` (see ``experiments/configs/default.py`` for every field).

Method (MVKT-ECG, Qin et al. 2023): the net being trained sees ``config.student.leads``
and minimises ``BCE + alpha * MKD + beta * CLT``; ``config.method`` picks the terms:

| method | loss |
|---|---|
| ``bce``  | BCE (also how the 12-lead teacher is trained) |
| ``kd``   | BCE + alpha * MKD at ``kd_temperature`` (Hinton-style tempered KD on logits) |
| ``mkd``  | BCE + alpha * MKD at ``mkd_temperature`` (the paper's T = 1) |
| ``clt``  | BCE + beta * CLT |
| ``mvkt`` | BCE + alpha * MKD + beta * CLT |

The frozen teacher is a separate pytree in the state (``state.teacher``): it is
not a parameter, gets no optimizer state, its outputs are under
``stop_gradient`` and it runs with BatchNorm running averages and no dropout.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import signal
import threading
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
import tqdm

from mvkt import checkpoints as ckpt_lib
from mvkt import data as data_lib
from mvkt import distributed
from mvkt import inference
from mvkt import input_pipeline
from mvkt import losses
from mvkt import metrics as metrics_lib
from mvkt import models
from mvkt import parallel as parallel_lib
from mvkt import run_dir

METHODS = ("bce", "kd", "mkd", "clt", "mvkt")
CLT_VARIANTS = ("memory_bank", "in_batch")


class TrainingDivergedError(RuntimeError):
    """A loss term became NaN/inf; the last good checkpoint is kept."""


class TrainingPreempted(Exception):
    """SIGTERM arrived: a checkpoint was saved and the process should exit.

    Raised (not returned) so that callers running several trainings in a row,
    like the study runners, stop too instead of moving on to the next run.
    """


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict  # {"model": net params, "heads": {"student", "teacher"} CLT projections}
    batch_stats: dict  # the trained net's BatchNorm statistics
    opt_state: Any
    memory_bank: Any  # losses.MemoryBank for memory-bank CLT, else None
    teacher: Any  # frozen {"params", "batch_stats"} or None; never differentiated


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Which loss terms a method uses and their hyper-parameters."""

    method: str
    alpha: float
    beta: float
    temperature: float
    clt_variant: str
    clt_temperature: float
    clt_dim: int
    num_negatives: int
    momentum: float
    mask_mode: str

    @property
    def uses_mkd(self) -> bool:
        return self.method in ("kd", "mkd", "mvkt")

    @property
    def uses_clt(self) -> bool:
        return self.method in ("clt", "mvkt")

    @property
    def needs_teacher(self) -> bool:
        return self.uses_mkd or self.uses_clt

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "LossSpec":
        if config.method not in METHODS:
            raise ValueError(f"config.method must be one of {METHODS}, not {config.method!r}")
        if config.clt.variant not in CLT_VARIANTS:
            raise ValueError(f"config.clt.variant must be one of {CLT_VARIANTS}, not {config.clt.variant!r}")
        temperature = config.kd_temperature if config.method == "kd" else config.mkd_temperature
        return cls(
            method=config.method,
            alpha=float(config.alpha),
            beta=float(config.beta),
            temperature=float(temperature),
            clt_variant=config.clt.variant,
            clt_temperature=float(config.clt.temperature),
            clt_dim=int(config.clt.dim),
            num_negatives=int(config.clt.num_negatives),
            momentum=float(config.clt.momentum),
            mask_mode=config.clt.mask_mode,
        )


# ----------------------------------------------------------------------------- building blocks


def mkd_class_weights(config: ml_collections.ConfigDict, label_names: list[str], num_classes: int) -> np.ndarray | None:
    """``config.mkd_class_weights`` ("CD:1,HYP:0"; unlisted classes 1) as a (C,) array, or None."""
    text = str(config.get("mkd_class_weights", "") or "")
    if not text:
        return None
    weights = np.ones(num_classes, np.float32)
    for item in text.split(","):
        name, _, value = item.partition(":")
        if name.strip() not in label_names:
            raise ValueError(f"config.mkd_class_weights names {name.strip()!r}, not one of the labels {label_names}")
        try:
            weights[label_names.index(name.strip())] = float(value)
        except ValueError:
            raise ValueError(f"config.mkd_class_weights: {item!r} is not CLASS:WEIGHT") from None
    return weights


def fold_splits(data_config: ml_collections.ConfigDict) -> dict[str, list[int]] | None:
    """{"train": [...], "val": [...], "test": [...]} from ``data.{train,val,test}_folds``, or
    None when none is set (the shards' own splits)."""
    texts = {name: str(data_config.get(f"{name}_folds", "") or "") for name in data_lib.SPLITS}
    if not any(texts.values()):
        return None
    if not all(texts.values()):
        raise ValueError(f"set all of data.train_folds, data.val_folds, data.test_folds or none: {texts}")
    try:
        folds = {name: [int(f) for f in text.split(",") if f.strip()] for name, text in texts.items()}
    except ValueError:
        raise ValueError(f"fold lists must be comma-separated integers: {texts}") from None
    flat = [f for fs in folds.values() for f in fs]
    if len(flat) != len(set(flat)):
        raise ValueError(f"a fold is in two splits: {folds}")
    return folds


def parse_leads(leads: str | list[str]) -> list[str]:
    """'I' | 'I,II,V2' | 'all' | a list -> validated lead names in the order given."""
    if isinstance(leads, str):
        names = (
            list(data_lib.LEADS)
            if leads.strip().lower() == "all"
            else [s.strip() for s in leads.split(",") if s.strip()]
        )
    else:
        names = list(leads)
    data_lib.lead_indices(names)  # raises a clear error for unknown names
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate leads in {leads!r}")
    return names


def make_schedule(train_config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    lr = float(train_config.learning_rate)
    if train_config.schedule == "onecycle":
        # As in the PTB-XL benchmark (fastai fit_one_cycle defaults).
        return optax.cosine_onecycle_schedule(
            transition_steps=max(total_steps, 1),
            peak_value=lr,
            pct_start=0.3,
            div_factor=25.0,
            final_div_factor=1e4,
        )
    if train_config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0,
            lr,
            warmup_steps=min(max(total_steps // 20, 1), max(total_steps - 1, 1)),
            decay_steps=max(total_steps, 2),
        )
    if train_config.schedule == "constant":
        return optax.constant_schedule(lr)
    raise ValueError(f"unknown schedule {train_config.schedule!r}: onecycle | cosine | constant")


def make_optimizer(
    train_config: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(train_config, total_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(float(train_config.grad_clip_norm)),
        optax.adamw(schedule, weight_decay=float(train_config.weight_decay)),
    )
    return tx, schedule


def create_train_state(
    *,
    rng: jax.Array,
    model: nn.Module,
    head: nn.Module | None,
    tx: optax.GradientTransformation,
    sample_x: jax.Array,
    train_labels: np.ndarray | None,
    loss_spec: LossSpec,
    teacher: Any,
    teacher_feature_dim: int | None,
) -> TrainState:
    """A fresh state; ``sample_x`` has the student's lead count."""
    init_rng, head_rng, bank_rng = jax.random.split(rng, 3)
    # Jitted: op-by-op initialisation of a deep net is slow and leaves memory behind.
    variables = jax.jit(functools.partial(model.init, train=False))(init_rng, sample_x)
    params = {"model": variables["params"], "heads": {}}
    memory_bank = None
    if loss_spec.uses_clt:
        _, features = model.apply(variables, sample_x, train=False)
        s_rng, t_rng = jax.random.split(head_rng)
        params["heads"] = {
            "student": head.init(s_rng, features)["params"],
            "teacher": head.init(t_rng, jnp.zeros((1, teacher_feature_dim), jnp.float32))["params"],
        }
        if loss_spec.clt_variant == "memory_bank":
            memory_bank = losses.init_memory_bank(
                bank_rng, labels=jnp.asarray(train_labels), dim=loss_spec.clt_dim
            )
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        memory_bank=memory_bank,
        teacher=teacher,
    )


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Input transforms inside the step, on the 12-lead crop, so that teacher and student see
    exactly the same input (function matching, Beyer et al. 2022); and lead dropout, for a
    teacher whose decisions should rest on the leads a student has.

    ``mixup_alpha``: mix records with weight ~ Beta(a, a) (labels mixed too; CLT masks use
    the dominant record's labels); ``amplitude_scale_std``: per record and lead gain
    exp(N(0, s)); ``noise_std``: Gaussian noise (standardised units); ``baseline_wander``:
    amplitude of a random 0.05-0.5 Hz sinusoid per record and lead; ``lead_dropout``:
    probability of zeroing each lead not in ``keep_leads`` (12-lead positions), per record.
    """

    mixup_alpha: float = 0.0
    amplitude_scale_std: float = 0.0
    noise_std: float = 0.0
    baseline_wander: float = 0.0
    lead_dropout: float = 0.0
    keep_leads: tuple[int, ...] = ()
    sampling_rate: int = 100

    @property
    def active(self) -> bool:
        return any((self.mixup_alpha, self.amplitude_scale_std, self.noise_std, self.baseline_wander,
                    self.lead_dropout))

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, sampling_rate: int) -> "Augmentation":
        aug = config.get("augment") or {}
        keep = str(aug.get("lead_dropout_keep", "") or "")
        return cls(
            mixup_alpha=float(aug.get("mixup_alpha", 0.0)),
            amplitude_scale_std=float(aug.get("amplitude_scale_std", 0.0)),
            noise_std=float(aug.get("noise_std", 0.0)),
            baseline_wander=float(aug.get("baseline_wander", 0.0)),
            lead_dropout=float(aug.get("lead_dropout", 0.0)),
            keep_leads=tuple(data_lib.lead_indices(parse_leads(keep))) if keep else (),
            sampling_rate=int(sampling_rate),
        )

    def __call__(self, rng: jax.Array, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(x, labels for the losses, labels for CLT's negative masks)."""
        b, t, leads = x.shape
        k_mix, k_lam, k_amp, k_noise, k_f, k_phase, k_wander, k_drop = jax.random.split(rng, 8)
        mask_labels = y
        if self.mixup_alpha:
            partner = jax.random.permutation(k_mix, b)
            lam = jax.random.beta(k_lam, self.mixup_alpha, self.mixup_alpha, (b,))
            x = lam[:, None, None] * x + (1 - lam[:, None, None]) * x[partner]
            mask_labels = jnp.where((lam >= 0.5)[:, None], y, y[partner])
            y = lam[:, None] * y + (1 - lam[:, None]) * y[partner]
        if self.amplitude_scale_std:
            x = x * jnp.exp(self.amplitude_scale_std * jax.random.normal(k_amp, (b, 1, leads)))
        if self.baseline_wander:
            freq = jax.random.uniform(k_f, (b, 1, leads), minval=0.05, maxval=0.5)
            phase = jax.random.uniform(k_phase, (b, 1, leads), maxval=2 * jnp.pi)
            amplitude = self.baseline_wander * jax.random.uniform(k_wander, (b, 1, leads))
            seconds = jnp.arange(t)[None, :, None] / self.sampling_rate
            x = x + amplitude * jnp.sin(2 * jnp.pi * freq * seconds + phase)
        if self.noise_std:
            x = x + self.noise_std * jax.random.normal(k_noise, x.shape)
        if self.lead_dropout:
            kept = jax.random.bernoulli(k_drop, 1.0 - self.lead_dropout, (b, 1, leads))
            always = np.zeros(leads, bool)
            always[list(self.keep_leads)] = True
            x = x * (kept | always).astype(x.dtype)
        return x, y, mask_labels


def make_update_fn(
    *,
    model: nn.Module,
    teacher_model: nn.Module | None,
    head: nn.Module | None,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    loss_spec: LossSpec,
    student_leads: list[int],
    replicated: jax.sharding.Sharding | None = None,
    teacher_leads: list[int] | None = None,
    augment: Augmentation | None = None,
    mkd_class_weights: np.ndarray | None = None,
) -> Callable:
    """The pure ``update_fn(state, batch, rng) -> (state, metrics)`` (jit it, donate state).

    ``teacher_leads``: the teacher's input leads in the 12-lead crop (default all 12; fewer
    for a teacher assistant). ``augment``: transforms of the crop before teacher and student.
    ``mkd_class_weights``: (C,) per-class weights of the MKD term.

    ``rng`` is the run's base key (not part of the donated state); each step folds
    its own step number into it, so a resumed run draws the same randomness.

    ``batch``: ``x`` (B, T, 12) the 12-lead crop, ``y`` (B, C) float, ``index`` (B,)
    train-record indices, optionally ``teacher_logits``/``teacher_features`` from the
    teacher cache. ``replicated``: the mesh's replicated sharding, used to gather CLT
    embeddings over the global batch before contrasting them.
    """
    lead_index = np.asarray(student_leads)
    teacher_index = np.asarray(teacher_leads if teacher_leads is not None else range(len(data_lib.LEADS)))
    augment = augment if augment is not None and augment.active else None

    def gather(x):
        # The whole global batch on every device: each anchor contrasts with all
        # negatives of the global batch, not only its own shard.
        return x if replicated is None else jax.lax.with_sharding_constraint(x, replicated)

    def update_fn(state: TrainState, batch: dict, rng: jax.Array):
        step_rng = jax.random.fold_in(rng, state.step)
        dropout_rng, clt_rng = jax.random.split(step_rng)
        x, labels, mask_labels = batch["x"], batch["y"], batch["y"]
        if augment is not None:
            # Its own stream: dropout and CLT draw what they drew without augmentation.
            x, labels, mask_labels = augment(jax.random.fold_in(step_rng, 0xA06), x, labels)
        x_student = x[..., lead_index]

        teacher_logits = teacher_features = None
        if loss_spec.needs_teacher:
            if "teacher_logits" in batch:
                teacher_logits, teacher_features = batch["teacher_logits"], batch["teacher_features"]
            else:
                teacher_logits, teacher_features = teacher_model.apply(
                    state.teacher, x[..., teacher_index], train=False
                )
            teacher_logits = jax.lax.stop_gradient(teacher_logits)
            teacher_features = jax.lax.stop_gradient(teacher_features)

        def loss_fn(params):
            (logits, features), mutated = model.apply(
                {"params": params["model"], "batch_stats": state.batch_stats},
                x_student,
                train=True,
                rngs={"dropout": dropout_rng},
                mutable=["batch_stats"],
            )
            terms = {"bce": losses.bce_with_logits(logits=logits, labels=labels)}
            total = terms["bce"]
            bank = state.memory_bank
            if loss_spec.uses_mkd:
                terms["mkd"] = losses.mkd_loss(
                    student_logits=logits,
                    teacher_logits=teacher_logits,
                    temperature=loss_spec.temperature,
                    class_weights=mkd_class_weights,
                )
                total = total + loss_spec.alpha * terms["mkd"]
            if loss_spec.uses_clt:
                student_embed = gather(head.apply({"params": params["heads"]["student"]}, features))
                teacher_embed = gather(head.apply({"params": params["heads"]["teacher"]}, teacher_features))
                clt_labels = gather(mask_labels)
                if loss_spec.clt_variant == "in_batch":
                    terms["clt"] = losses.in_batch_clt_loss(
                        student_embed=student_embed,
                        teacher_embed=teacher_embed,
                        labels=clt_labels,
                        temperature=loss_spec.clt_temperature,
                        mask_mode=loss_spec.mask_mode,
                    )
                else:
                    terms["clt"], bank = losses.memory_bank_clt_loss(
                        student_embed=student_embed,
                        teacher_embed=teacher_embed,
                        indices=gather(batch["index"]),
                        labels=clt_labels,
                        bank=bank,
                        rng=clt_rng,
                        num_negatives=loss_spec.num_negatives,
                        temperature=loss_spec.clt_temperature,
                        momentum=loss_spec.momentum,
                        mask_mode=loss_spec.mask_mode,
                    )
                total = total + loss_spec.beta * terms["clt"]
            return total, (terms, mutated["batch_stats"], bank)

        (loss, (terms, batch_stats, bank)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step)}
        metrics.update({f"loss_{name}": value for name, value in terms.items()})
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, memory_bank=bank
        )
        return new_state, metrics

    return update_fn


@dataclasses.dataclass(frozen=True)
class Training:
    """Everything one training run compiles, built from a config by ``build_training``."""

    model: nn.Module
    head: nn.Module | None  # CLT projection head (both sides use this module), else None
    loss_spec: LossSpec
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    student_leads: list[int]  # positions of the trained net's leads in the 12-lead crop
    state: TrainState  # fresh, replicated over ``parallel``'s mesh
    update: Callable  # jitted ``update_fn(state, batch, rng) -> (state, metrics)``


def build_training(
    config: ml_collections.ConfigDict,
    *,
    num_classes: int,
    crop_length: int,
    total_steps: int,
    parallel: parallel_lib.Parallelism,
    rng: jax.Array,
    train_labels: np.ndarray | None = None,
    teacher: tuple[nn.Module, Any] | None = None,
    optimizer: tuple[optax.GradientTransformation, optax.Schedule] | None = None,
    donate: bool = True,
    teacher_leads: list[str] | None = None,
    label_names: list[str] | None = None,
    sampling_rate: int = 100,
) -> Training:
    """The one place a train state and its jitted step are made from a config.

    ``teacher``: ``(teacher_model, teacher_variables)``, needed by kd/mkd/clt/mvkt.
    ``train_labels``: the train split's multi-hot labels (the CLT memory bank keeps them).
    ``optimizer``: ``(tx, schedule)`` instead of the config's (tests use plain SGD).
    ``donate``: donate the state to the step (off when a test reuses a state).
    ``teacher_leads``: the teacher's leads (default all 12; fewer for a teacher assistant).
    ``label_names``: needed for ``config.mkd_class_weights``; ``sampling_rate`` for the
    baseline-wander augmentation.
    """
    loss_spec = LossSpec.from_config(config)
    if loss_spec.needs_teacher and teacher is None:
        raise ValueError(f"method {config.method!r} needs teacher=(teacher_model, teacher_variables)")
    student_leads = data_lib.lead_indices(parse_leads(config.student.leads))
    model = models.from_config(config.student, num_classes)
    head = models.ProjectionHead(dim=loss_spec.clt_dim) if loss_spec.uses_clt else None
    tx, schedule = optimizer or make_optimizer(config.train, total_steps)
    augment = Augmentation.from_config(config, sampling_rate)
    if config.get("teacher_cache") and loss_spec.needs_teacher and augment.active:
        raise ValueError("config.augment changes the teacher's input every step: precomputed teacher outputs "
                         "cannot follow it; set --config.teacher_cache=False (function matching runs the teacher online)")
    teacher_model, teacher_variables = teacher if loss_spec.needs_teacher else (None, None)
    teacher_index = data_lib.lead_indices(teacher_leads or list(data_lib.LEADS))
    teacher_feature_dim = None
    if teacher_model is not None:
        sample12 = jnp.zeros((1, crop_length, len(teacher_index)), jnp.float32)
        teacher_feature_dim = jax.eval_shape(
            lambda v: teacher_model.apply(v, sample12, train=False), teacher_variables
        )[1].shape[-1]
    state = create_train_state(
        rng=rng,
        model=model,
        head=head,
        tx=tx,
        sample_x=jnp.zeros((1, crop_length, len(student_leads)), jnp.float32),
        train_labels=train_labels if loss_spec.uses_clt else None,
        loss_spec=loss_spec,
        teacher=teacher_variables,
        teacher_feature_dim=teacher_feature_dim,
    )
    update_fn = make_update_fn(
        model=model,
        teacher_model=teacher_model,
        head=head,
        tx=tx,
        schedule=schedule,
        loss_spec=loss_spec,
        student_leads=student_leads,
        replicated=parallel.replicated,
        teacher_leads=teacher_index,
        augment=augment,
        mkd_class_weights=mkd_class_weights(config, label_names or [], num_classes),
    )
    return Training(
        model=model,
        head=head,
        loss_spec=loss_spec,
        tx=tx,
        schedule=schedule,
        student_leads=student_leads,
        state=parallel.replicate(state),
        update=jax.jit(update_fn, donate_argnums=(0,) if donate else ()),
    )


# ----------------------------------------------------------------------------- run directory


class _StopRequest:
    """SIGTERM (preemption) -> save at the next step and exit cleanly."""

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


def _teacher_for(
    config: ml_collections.ConfigDict, label_names: list[str], parallel: parallel_lib.Parallelism
):
    """(model, variables, info, meta) of ``config.teacher_workdir``; a comma-separated list of
    run folders is a teacher ensemble (``models.Ensemble``: mean logits, first member's features)."""
    members = _teachers(config, label_names, parallel)
    if len(members) == 1:
        return members[0]
    first_info = members[0][2]
    for _, _, info, _ in members[1:]:
        for key in ("leads", "folds", "crop_length"):
            if info.get(key) != first_info.get(key):
                raise ValueError(f"the teachers of an ensemble must share their {key}: {first_info.get(key)} "
                                 f"and {info.get(key)} ({config.teacher_workdir})")
    model = models.Ensemble(members=tuple(m for m, _, _, _ in members))
    variables = parallel.replicate(models.ensemble_variables([v for _, v, _, _ in members]))
    meta = {"step": [m["step"] for *_, m in members], "val_macro_auc": [m.get("val_macro_auc") for *_, m in members]}
    return model, variables, first_info, meta


def teacher_workdirs(config: ml_collections.ConfigDict) -> list[str]:
    """The run folders ``config.teacher_workdir`` lists (one teacher, or an ensemble ``A,B,C``)."""
    return [w.strip() for w in str(config.teacher_workdir).split(",") if w.strip()]


def _teachers(config: ml_collections.ConfigDict, label_names: list[str], parallel: parallel_lib.Parallelism) -> list:
    """[(model, variables, info, meta)] of every run folder listed in ``config.teacher_workdir``."""
    if not config.teacher_workdir:
        raise ValueError(f"method {config.method!r} needs a trained teacher: set --config.teacher_workdir")
    return [_one_teacher(config, w, label_names, parallel) for w in teacher_workdirs(config)]


def _check_cross_fit(members: list, folds: dict | None, config: ml_collections.ConfigDict) -> list[set[int]]:
    """Each teacher's training folds; refuses teachers that saw this run's validation or test
    folds, and training folds that no teacher left out (their records would have no target)."""
    if not config.teacher_cache or len(members) < 2 or folds is None:
        raise ValueError("config.teacher_cross_fit needs --config.teacher_cache=True, two or more teachers in "
                         "--config.teacher_workdir, and explicit data.{train,val,test}_folds")
    seen = []
    for _, _, info, _ in members:
        theirs = info.get("folds") or {}
        if theirs.get("val") != folds["val"] or theirs.get("test") != folds["test"] or not set(
                theirs.get("train", [])) <= set(folds["train"]):
            raise ValueError(f"cross-fitted teacher folds {theirs} do not fit this run's {folds}: same val and test "
                             "folds, training folds a part of this run's")
        seen.append(set(theirs["train"]))
    uncovered = sorted(f for f in folds["train"] if all(f in s for s in seen))
    if uncovered:
        raise ValueError(f"every teacher saw fold(s) {uncovered}: their records have no cross-fitted target")
    return seen


def cross_fitted_cache(members: list, seen: list[set[int]], loader: input_pipeline.TrainBatches, *, batch_size: int,
                       parallel: parallel_lib.Parallelism, teacher_leads: list[int]) -> TeacherCache:
    """Per record, the mean logits of the teachers that never trained on its fold, and the
    features of the first of them (cross-fitting: no target comes from a teacher that saw
    the record). Each teacher sees the crops standardised as its own training folds were."""
    caches = [teacher_cache(m, v, loader, batch_size=batch_size, parallel=parallel, teacher_leads=teacher_leads,
                            standardization=info["preprocessing"]["standardization"])
              for m, v, info, _ in members]
    folds = np.asarray(loader.split.folds)
    eligible = np.stack([~np.isin(folds, sorted(s)) for s in seen], axis=1).astype(np.float32)  # (N, K)
    logits = np.einsum("nk,kngc->ngc", eligible, np.stack([c.logits for c in caches])) / eligible.sum(1)[:, None, None]
    first = eligible.argmax(axis=1)
    features = np.stack([c.features for c in caches])[first, np.arange(len(folds))]
    return TeacherCache(logits.astype(caches[0].logits.dtype), features, caches[0].grid)


def _one_teacher(config, workdir: str, label_names: list[str], parallel: parallel_lib.Parallelism):
    if not run_dir.is_finished(workdir):
        done, total = run_dir.trained_steps(workdir)
        where = f"teacher {workdir} stopped at step {done}/{total}"
        if not config.allow_unfinished_teacher:
            raise ValueError(
                f"{where}: finish it (rerun its training command) or pass "
                "--config.allow_unfinished_teacher=true to distil from it anyway"
            )
        logging.warning("%s: distilling from it anyway (config.allow_unfinished_teacher)", where)
    model, variables, _, info, meta = run_dir.load_trained_model(workdir, which="best", parallel=parallel)
    if info["label_names"] != list(label_names):
        raise ValueError(
            f"teacher in {workdir} was trained on labels {info['label_names']}, these shards have {list(label_names)}"
        )
    student = set(parse_leads(config.student.leads))
    if not student <= set(info["leads"]):
        # A teacher (or a teacher assistant on fewer leads, e.g. I, II, V2) sees what the student sees.
        raise ValueError(f"teacher in {workdir} sees leads {info['leads']}: a teacher needs all "
                         f"of the student's leads {sorted(student)}")
    return model, variables, info, meta


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


# Standardised signals are z-scores: a sample this many standard deviations out is not an ECG.
ABSURD_SAMPLE = 1e3


def bad_records(loader: input_pipeline.TrainBatches, steps: range) -> list[str]:
    """Ids of the records with non-finite or absurd (|x| > ABSURD_SAMPLE) samples in the
    crops of the global batches of ``steps`` (recomputed: batches are a function of the step)."""
    bad = set()
    for step in steps:
        indices, starts = loader.indices_at(step)
        x = loader.split.crop(indices, starts, loader.crop_length)
        broken = ~np.isfinite(x).all(axis=(1, 2)) | (np.abs(np.nan_to_num(x)) > ABSURD_SAMPLE).any(axis=(1, 2))
        bad.update(str(loader.split.record_ids[i]) for i in indices[broken])
    return sorted(bad)


def _check_finite(values: dict, *, step: int, since: int, loader: input_pipeline.TrainBatches,
                  data_dir: str) -> None:
    """Raises ``TrainingDivergedError`` for a non-finite loss, saying whether the data of
    the steps since the last check was to blame or the optimisation diverged."""
    bad = {k: v for k, v in values.items() if not np.isfinite(v)}
    if not bad:
        return
    records = bad_records(loader, range(since, step))
    if records:
        shown = ", ".join(records[:10]) + (f" and {len(records) - 10} more" if len(records) > 10 else "")
        raise TrainingDivergedError(
            f"non-finite loss at step {step}: {bad}. The training batches of steps {since + 1}-{step} hold "
            f"non-finite or absurd (|x| > {ABSURD_SAMPLE:g}) samples in record(s) {shown} of {data_dir}: "
            f"check the shards (python -c \"from mvkt import data; data.verify_shards('{data_dir}')\") "
            "and prepare them again. The last good checkpoint is kept."
        )
    raise TrainingDivergedError(
        f"non-finite loss at step {step}: {bad}; the training batches of steps {since + 1}-{step} are "
        "finite, so the optimisation diverged. The run stopped; the last good checkpoint is kept. "
        "Lower the learning rate (--config.train.learning_rate) or enable gradient clipping."
    )


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


def _train(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    *,
    parallel: parallel_lib.Parallelism,
    progress: bool,
) -> dict:
    is_chief = distributed.is_chief()
    loss_spec = LossSpec.from_config(config)
    # Damaged shards are found before training, not as a diverged loss hours later; each
    # host checks its own copy (hashed once per change of the files).
    distributed.on_every_process(data_lib.verify_shards, config.data.dir, cache_dir=data_lib.default_cache_dir())
    if config.teacher_cache and config.data.random_crop and not config.get("teacher_cache_stride_seconds"):
        raise ValueError(
            "config.teacher_cache=True with random crops needs a grid of crop starts: set "
            "--config.teacher_cache_stride_seconds (e.g. 0.25), or --config.data.random_crop=False"
        )
    folds = fold_splits(config.data)
    train_split = data_lib.open_split(config.data.dir, "train", folds=folds)
    val_split = data_lib.open_split(config.data.dir, "val", folds=folds)
    label_names = list(train_split.label_names)
    leads = parse_leads(config.student.leads)
    crop_length = int(round(config.data.crop_seconds * train_split.sampling_rate))
    batch_size = int(config.train.batch_size)

    loader = input_pipeline.TrainBatches(
        train_split,
        global_batch_size=batch_size,
        crop_length=crop_length,
        random_crop=bool(config.data.random_crop),
        seed=int(config.seed),
        host_rows=parallel.host_slice(batch_size),
        # Cached teachers see random crops on a grid, so every crop's outputs can be precomputed.
        crop_grid=(max(int(round(config.teacher_cache_stride_seconds * train_split.sampling_rate)), 1)
                   if config.teacher_cache and config.data.random_crop else None),
    )
    total_steps = int(config.train.epochs) * loader.steps_per_epoch
    info = {
        "label_names": label_names,
        "leads": leads,
        "crop_length": crop_length,
        "sampling_rate": train_split.sampling_rate,
        "data_dir": str(pathlib.Path(config.data.dir).absolute()),
        "folds": folds,  # None: the shards' own train/val/test splits
        "method": config.method,
        "steps_per_epoch": loader.steps_per_epoch,
        "total_steps": total_steps,
        "num_devices": parallel.num_devices,
        "num_processes": jax.process_count(),
        "config_hash": run_dir.config_hash(config),
        # Everything inference needs, so that the run folder works without its shards.
        "preprocessing": run_dir.preprocessing_of(train_split.manifest),
        "inference": {
            "window": crop_length,
            "stride": max(int(crop_length * config.data.eval_stride_fraction), 1),
            "aggregate": config.eval.aggregate,
        },
        "provenance": run_dir.provenance(),
    }
    _say(is_chief, f"run folder {workdir}: {config.method} on leads {','.join(leads)}, {total_steps} steps "
                   f"({int(config.train.epochs)} epochs x {loader.steps_per_epoch}), global batch {batch_size} "
                   f"on {parallel.num_devices} device(s) in {jax.process_count()} process(es)")
    _say(is_chief, f"data {info['data_dir']}: {len(train_split)} training and {len(val_split)} validation records"
                   + (f" (folds {folds['train']} / {folds['val']})" if folds else ""))
    # Every process checks the old config before the chief replaces it.
    if (workdir / run_dir.CHECKPOINTS_DIR).is_dir():
        run_dir.check_resume_config(workdir, config)
    distributed.barrier(f"config-checked:{workdir}")
    run_dir.write_config_and_info(workdir, config, info)

    teacher = None
    cross_fit = None  # (members, folds each saw) with config.teacher_cross_fit
    if loss_spec.needs_teacher and config.get("teacher_cross_fit"):
        members = _teachers(config, label_names, parallel)
        cross_fit = (members, _check_cross_fit(members, folds, config))
        teacher_model, teacher_variables, teacher_info, teacher_meta = members[0]  # for shapes only
        teacher = (teacher_model, teacher_variables)
    elif loss_spec.needs_teacher:
        teacher_model, teacher_variables, teacher_info, teacher_meta = _teacher_for(
            config, label_names, parallel
        )
        if teacher_info.get("folds") != folds:
            # A teacher trained on other folds may have seen this student's validation or test records.
            raise ValueError(
                f"teacher {config.teacher_workdir} was trained on folds {teacher_info.get('folds')}, this run "
                f"uses {folds}: use the teacher of the same cross-validation round"
            )
        teacher = (teacher_model, teacher_variables)
        logging.info(
            "teacher: %s (step %s, val macro-AUC %s)",
            config.teacher_workdir,
            teacher_meta.get("step"),
            teacher_meta.get("val_macro_auc"),
        )

    init_rng, rng = jax.random.split(jax.random.PRNGKey(int(config.seed)))
    training = build_training(
        config,
        num_classes=len(label_names),
        crop_length=crop_length,
        total_steps=total_steps,
        parallel=parallel,
        rng=init_rng,
        train_labels=train_split.y,
        teacher=teacher,
        teacher_leads=teacher_info["leads"] if teacher is not None else None,
        label_names=label_names,
        sampling_rate=train_split.sampling_rate,
    )
    state, rng = training.state, parallel.replicate(rng)

    checkpoints = ckpt_lib.RunCheckpoints(workdir, keep=int(config.train.keep_checkpoints))
    best_auc = -math.inf
    if checkpoints.latest_step() is not None:
        try:
            model_part, train_part, meta = checkpoints.restore_latest(
                model=_model_part(state), train=_train_part(state, rng)
            )
        except BaseException:
            # Release the managers (and orbax's pending reads of the damaged steps) here, as the
            # training loop's `finally` does, not at interpreter exit after the error is printed.
            checkpoints.close()
            raise
        state, rng = _merge(state, model_part, train_part), train_part["rng"]
        best = checkpoints.best_meta()
        best_auc = best["val_macro_auc"] if best and best.get("val_macro_auc") is not None else -math.inf
        _say(is_chief, f"{workdir.name}: resumed at step {int(state.step)}/{total_steps}")
    start_step = int(state.step)
    if start_step >= total_steps:
        checkpoints.close()
        _say(
            is_chief, f"{workdir.name}: already finished ({start_step}/{total_steps} steps), nothing to train"
        )
        return {
            "workdir": str(workdir),
            "step": start_step,
            "total_steps": total_steps,
            "best_val_macro_auc": best_auc,
            "resumed_finished": True,
        }
    log = run_dir.MetricsLog(workdir, resume_step=start_step, enabled=is_chief)
    # Nobody reads the run folder's files before the chief has (re)written them.
    distributed.barrier(f"run-files-written:{workdir}:{start_step}")

    cache = None
    if config.teacher_cache and loss_spec.needs_teacher:
        if cross_fit is not None:
            cache = cross_fitted_cache(*cross_fit, loader, batch_size=batch_size, parallel=parallel,
                                       teacher_leads=data_lib.lead_indices(teacher_info["leads"]))
        else:
            cache = teacher_cache(*teacher, loader, batch_size=batch_size, parallel=parallel,
                                  teacher_leads=data_lib.lead_indices(teacher_info["leads"]))

    def produce(step):
        indices, starts = loader.host_crops(step)
        batch = loader.batch_of(indices, starts)
        if cache is not None:
            batch.update(cache.lookup(indices, starts))
        return parallel.to_global(batch)

    update = training.update
    forward = inference.make_forward_fn(training.model, training.student_leads, parallel)
    window = crop_length
    stride = info["inference"]["stride"]
    stop_at = int(config.train.stop_at_step) if config.train.stop_at_step else None

    def validate() -> tuple[float | None, dict]:
        """Validation macro-AUC (None when no class has both positives and negatives there)
        and the per-class AUCs that are defined."""
        scores = inference.predict_records(
            forward,
            {"params": state.params["model"], "batch_stats": state.batch_stats},
            val_split,
            window=window,
            stride=stride,
            batch_size=int(config.eval.batch_size),
            parallel=parallel,
            aggregate=config.eval.aggregate,
        )
        if not metrics_lib.valid_class_mask(y_true=val_split.y).any():
            return None, {}
        result = metrics_lib.per_class_auc(y_true=val_split.y, y_score=scores, label_names=label_names)
        return result.macro_auc, {f"val_auc/{k}": v for k, v in result.per_class_auc.items() if v is not None}

    def save(step, epoch, val_auc, best):
        meta = {
            "step": step,
            "epoch": epoch,
            "val_macro_auc": val_auc,
            "best_val_macro_auc": best_auc,
            "config_hash": info["config_hash"],
            "label_names": label_names,
            "leads": leads,
        }
        checkpoints.save(step, model=_model_part(state), train=_train_part(state, rng), meta=meta, best=best)

    pending: list[dict] = []
    last_log_time, last_log_step = time.perf_counter(), start_step
    preempted = False
    bar = _progress_bar(progress and is_chief, start_step, total_steps, workdir.name)
    with _StopRequest() as stop:
        try:
            for step, batch in input_pipeline.Prefetcher(produce, start_step, total_steps):
                state, step_metrics = update(state, batch, rng)
                pending.append(step_metrics)
                done = step + 1
                epoch_end = done % loader.steps_per_epoch == 0
                planned_stop = stop_at is not None and done >= stop_at
                bar.update(1)
                # Log points depend only on the step, so every process reaches the same ones;
                # a SIGTERM on any process is acted on at the next one, by all of them.
                if done % int(config.train.log_every_steps) and not (epoch_end or planned_stop):
                    continue
                preempted = distributed.any_process(stop.requested)
                must_stop = preempted or planned_stop
                # Host read of device metrics only here, at log points.
                means = {
                    k: float(v)
                    for k, v in jax.device_get(
                        jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *pending)
                    ).items()
                }
                pending.clear()
                _check_finite(
                    {k: v for k, v in means.items() if k.startswith("loss")},
                    step=done,
                    since=last_log_step,
                    loader=loader,
                    data_dir=str(config.data.dir),
                )
                now = time.perf_counter()
                seconds_per_step = (now - last_log_time) / (done - last_log_step)
                last_log_time, last_log_step = now, done
                row = {
                    "step": done,
                    "epoch": done / loader.steps_per_epoch,
                    **means,
                    "step_time_s": seconds_per_step,
                    "samples_per_s": batch_size / seconds_per_step,
                }
                log.write(row)
                if bar.disable:  # no progress bar (not a terminal, or progress=False): a log line instead
                    terms = ", ".join(f"{k[5:]} {v:.4f}" for k, v in means.items() if k.startswith("loss_"))
                    _say(is_chief, f"{workdir.name} step {done}/{total_steps}: loss {means['loss']:.4f}"
                                   + (f" ({terms})" if terms else "") + f", {row['samples_per_s']:.0f} samples/s")
                bar.set_postfix(loss=f"{means['loss']:.4f}", sps=f"{row['samples_per_s']:.0f}")
                if epoch_end:
                    epoch = done // loader.steps_per_epoch
                    val_auc, validated = None, False
                    if epoch % int(config.eval.every_epochs) == 0 or done == total_steps:
                        (val_auc, per_class), validated = validate(), True
                        log.write({"step": done, "epoch": epoch, "val_macro_auc": val_auc, **per_class})
                        _say(
                            is_chief,
                            f"{workdir.name} epoch {epoch}: loss {means['loss']:.4f} val macro-AUC "
                            + ("undefined" if val_auc is None else f"{val_auc:.4f}"),
                        )
                        if val_auc is None and best_auc == -math.inf:
                            logging.warning(
                                "%s: no class of the validation split (%d records) has both positives and "
                                "negatives: validation macro-AUC is undefined, the best checkpoint is the "
                                "latest until it is defined", workdir, len(val_split))
                    # An undefined validation AUC cannot select: the latest checkpoint stands in as best
                    # until a defined one exists (tiny validation folds, e.g. of the embedded sample).
                    improved = (val_auc is not None and val_auc > best_auc) or (
                        validated and val_auc is None and best_auc == -math.inf)
                    if improved and val_auc is not None:
                        best_auc = val_auc
                    save(done, epoch, val_auc, improved)
                elif must_stop:
                    save(done, done / loader.steps_per_epoch, None, False)
                if must_stop:
                    _say(
                        is_chief,
                        f"{workdir.name}: checkpoint saved, stopped at step {done}/{total_steps} "
                        f"({'SIGTERM' if preempted else 'train.stop_at_step'}); rerun to continue",
                    )
                    break
        finally:
            bar.close()
            log.close()
            checkpoints.wait()
            checkpoints.close()
        # A SIGTERM after the last log point: all processes still leave the same way.
        preempted = distributed.any_process(preempted or stop.requested)
    if preempted:
        raise TrainingPreempted(
            f"{workdir}: SIGTERM at step {int(state.step)}/{total_steps}; "
            "checkpoint saved, rerun the same command to continue"
        )
    final_step = int(state.step)
    return {
        "workdir": str(workdir),
        "step": final_step,
        "total_steps": total_steps,
        "best_val_macro_auc": best_auc,
        "resumed_finished": False,
        "finished": final_step >= total_steps,
    }


def _model_part(state: TrainState) -> dict:
    return {"params": state.params["model"], "batch_stats": state.batch_stats}


def _train_part(state: TrainState, rng: jax.Array) -> dict:
    part = {"step": state.step, "heads": state.params["heads"], "opt_state": state.opt_state, "rng": rng}
    if state.memory_bank is not None:
        part["memory_bank"] = state.memory_bank
    return part


def _merge(state: TrainState, model_part: dict, train_part: dict) -> TrainState:
    return state.replace(
        step=train_part["step"],
        params={"model": model_part["params"], "heads": train_part["heads"]},
        batch_stats=model_part["batch_stats"],
        opt_state=train_part["opt_state"],
        memory_bank=train_part.get("memory_bank", state.memory_bank),
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
