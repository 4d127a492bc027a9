"""The train state and its one builder: the pure ``update_fn(state, batch, rng) -> (state,
metrics)`` and ``build_training``, which makes both from a config.

Method (MVKT-ECG, Qin et al. 2023): the net being trained sees its config's leads and
minimises ``BCE + alpha * MKD + beta * CLT``; ``config.method`` picks the terms
(``METHOD_TERMS``):

| method | loss |
|---|---|
| ``bce``  | BCE (also how the 12-lead teacher is trained) |
| ``kd``   | BCE + alpha * MKD at ``kd_temperature`` (Hinton-style tempered KD on logits) |
| ``mkd``  | BCE + alpha * MKD at ``mkd_temperature`` (the paper's T = 1) |
| ``clt``  | BCE + beta * CLT |
| ``mvkt`` | BCE + alpha * MKD + beta * CLT |

New terms and methods come in through ``register_loss_term`` and ``register_method``
(docs/DESIGN.md, "How to add a loss").

The frozen teacher is a separate pytree in the state (``state.teacher``): it is
not a parameter, gets no optimizer state, its outputs are under
``stop_gradient`` and it runs with BatchNorm running averages and no dropout.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mvkt import augment as augment_lib
from mvkt import data as data_lib
from mvkt import losses
from mvkt import models
from mvkt import parallel as parallel_lib
from mvkt import run_config

CLT_VARIANTS = run_config.CLT_VARIANTS


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict  # {"model": net params, "heads": {"student", "teacher"} CLT projections}
    batch_stats: dict  # the trained net's BatchNorm statistics
    opt_state: Any
    memory_bank: Any  # losses.MemoryBank for memory-bank CLT, else None
    teacher: Any  # frozen {"params", "batch_stats"} or None; never differentiated

    # The checkpoint items (mvkt.checkpoints): "model" is what inference restores alone;
    # "train" the rest of the state and the run's rng; the frozen teacher is never saved.
    def model_items(self) -> dict:
        return {"params": self.params["model"], "batch_stats": self.batch_stats}

    def train_items(self, rng: jax.Array) -> dict:
        items = {"step": self.step, "heads": self.params["heads"], "opt_state": self.opt_state, "rng": rng}
        if self.memory_bank is not None:
            items["memory_bank"] = self.memory_bank
        return items

    def restored(self, model_items: dict, train_items: dict) -> "TrainState":
        return self.replace(
            step=train_items["step"],
            params={"model": model_items["params"], "heads": train_items["heads"]},
            batch_stats=model_items["batch_stats"],
            opt_state=train_items["opt_state"],
            memory_bank=train_items.get("memory_bank", self.memory_bank),
        )


@dataclasses.dataclass(frozen=True)
class TermInputs:
    """What a distillation loss term sees inside the step (traced values, one step)."""

    spec: "LossSpec"
    logits: jax.Array  # (B, C) the trained net's
    features: jax.Array  # (B, F) its pooled features
    mask_labels: jax.Array  # (B, C) labels for CLT's negative masks (the dominant record's under mixup)
    teacher_logits: jax.Array | None  # (B, C) under stop_gradient
    teacher_features: jax.Array | None  # (B, F_teacher) under stop_gradient
    heads: dict  # trainable CLT projection heads {"student", "teacher"}
    head: nn.Module | None
    index: jax.Array  # (B,) train-record indices
    bank: Any  # losses.MemoryBank or None
    rng: jax.Array
    gather: Callable  # constrains an array to replicated: the global batch on every device
    mkd_class_weights: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class LossTerm:
    """A term added to BCE: ``fn(inputs) -> (value, memory bank)``, weighted by the config
    field ``weight_field``."""

    fn: Callable[[TermInputs], tuple[jax.Array, Any]]
    weight_field: str
    needs_teacher: bool = True


def _mkd_term(inputs: TermInputs) -> tuple[jax.Array, Any]:
    value = losses.mkd_loss(
        student_logits=inputs.logits,
        teacher_logits=inputs.teacher_logits,
        temperature=inputs.spec.temperature,
        class_weights=inputs.mkd_class_weights,
    )
    return value, inputs.bank


def _clt_term(inputs: TermInputs) -> tuple[jax.Array, Any]:
    spec, gather = inputs.spec, inputs.gather
    student_embed = gather(inputs.head.apply({"params": inputs.heads["student"]}, inputs.features))
    teacher_embed = gather(inputs.head.apply({"params": inputs.heads["teacher"]}, inputs.teacher_features))
    clt_labels = gather(inputs.mask_labels)
    if spec.clt_variant == "in_batch":
        value = losses.in_batch_clt_loss(student_embed=student_embed, teacher_embed=teacher_embed,
                                         labels=clt_labels, temperature=spec.clt_temperature,
                                         mask_mode=spec.mask_mode)
        return value, inputs.bank
    return losses.memory_bank_clt_loss(
        student_embed=student_embed, teacher_embed=teacher_embed, indices=gather(inputs.index),
        labels=clt_labels, bank=inputs.bank, rng=inputs.rng, num_negatives=spec.num_negatives,
        temperature=spec.clt_temperature, momentum=spec.momentum, mask_mode=spec.mask_mode)


LOSS_TERMS: dict[str, LossTerm] = {"mkd": LossTerm(_mkd_term, "alpha"), "clt": LossTerm(_clt_term, "beta")}
# Each method's terms after BCE, in the order they are added (the order is part of the numbers).
METHOD_TERMS: dict[str, tuple[str, ...]] = {
    "bce": (), "kd": ("mkd",), "mkd": ("mkd",), "clt": ("clt",), "mvkt": ("mkd", "clt")}


def register_loss_term(name: str, term: LossTerm) -> None:
    if name in LOSS_TERMS or name == "bce":
        raise ValueError(f"a loss term {name!r} exists already")
    LOSS_TERMS[name] = term


def register_method(name: str, terms: Sequence[str]) -> None:
    """``config.method=name`` trains BCE plus ``terms`` (names in ``LOSS_TERMS``)."""
    unknown = [t for t in terms if t not in LOSS_TERMS]
    if name in METHOD_TERMS or unknown:
        raise ValueError(f"method {name!r}: exists already or names unknown terms {unknown}")
    METHOD_TERMS[name] = tuple(terms)


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Which loss terms a method uses and their hyper-parameters."""

    method: str
    temperature: float
    clt_variant: str
    clt_temperature: float
    clt_dim: int
    num_negatives: int
    momentum: float
    mask_mode: str
    terms: tuple[str, ...] = ()
    weights: Mapping[str, float] = dataclasses.field(default_factory=dict)  # term -> its config weight

    @property
    def uses_mkd(self) -> bool:
        return "mkd" in self.terms

    @property
    def uses_clt(self) -> bool:
        return "clt" in self.terms

    @property
    def needs_teacher(self) -> bool:
        return any(LOSS_TERMS[t].needs_teacher for t in self.terms)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "LossSpec":
        if config.method not in METHOD_TERMS:
            raise ValueError(f"config.method must be one of {tuple(METHOD_TERMS)}, not {config.method!r}")
        if config.clt.variant not in CLT_VARIANTS:
            raise ValueError(f"config.clt.variant must be one of {CLT_VARIANTS}, not {config.clt.variant!r}")
        terms = METHOD_TERMS[config.method]
        temperature = config.kd_temperature if config.method == "kd" else config.mkd_temperature
        return cls(
            method=config.method,
            temperature=float(temperature),
            clt_variant=config.clt.variant,
            clt_temperature=float(config.clt.temperature),
            clt_dim=int(config.clt.dim),
            num_negatives=int(config.clt.num_negatives),
            momentum=float(config.clt.momentum),
            mask_mode=config.clt.mask_mode,
            terms=terms,
            weights={t: float(config[LOSS_TERMS[t].weight_field]) for t in terms},
        )


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
    if train_config.schedule == "mvkt_official":
        # QINYZz/MVKT-ECG's adjust_learning_rate, per epoch: 0.001 * (epoch + 1) for the first
        # 15 epochs (a ramp to 0.015, whatever the base rate), then the base rate, x0.1 from
        # epoch 40 and again from epoch 70.
        steps_per_epoch = max(total_steps // max(int(train_config.epochs), 1), 1)

        def official(step):
            epoch = step // steps_per_epoch
            decayed = lr * jnp.where(epoch >= 40, 0.1, 1.0) * jnp.where(epoch >= 70, 0.1, 1.0)
            return jnp.where(epoch < 15, 0.001 * (epoch + 1), decayed).astype(jnp.float32)

        return official
    raise ValueError(f"unknown schedule {train_config.schedule!r}: onecycle | cosine | constant | mvkt_official")


def make_optimizer(
    train_config: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(train_config, total_steps)
    clip = float(train_config.grad_clip_norm)
    clipping = [optax.clip_by_global_norm(clip)] if clip > 0 else []  # 0: off
    optimizer = str(train_config.get("optimizer", "adamw"))
    weight_decay = float(train_config.weight_decay)
    if optimizer == "adamw":  # decoupled weight decay
        update = [optax.adamw(schedule, weight_decay=weight_decay)]
    elif optimizer == "adam":  # torch.optim.Adam's weight_decay: an L2 term added to the gradient
        update = [optax.add_decayed_weights(weight_decay), optax.scale_by_adam(),
                  optax.scale_by_learning_rate(schedule)]
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}: adamw | adam")
    return optax.chain(*clipping, *update), schedule


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
        # The heads' initial parameters depend on the features' shape only. Running the net here, op
        # by op, compiled one program per operation and kept them all (94-173 MB on CPU,
        # benchmarks/memory.py).
        features = jax.eval_shape(lambda v: model.apply(v, sample_x, train=False)[1], variables)
        s_rng, t_rng = jax.random.split(head_rng)
        params["heads"] = {
            "student": head.init(s_rng, jnp.zeros(features.shape, features.dtype))["params"],
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
    augment: augment_lib.Augmentation | None = None,
    mkd_class_weights: np.ndarray | None = None,
    corrupt: augment_lib.Corruption | None = None,
) -> Callable:
    """The pure ``update_fn(state, batch, rng) -> (state, metrics)`` (jit it, donate state).

    ``teacher_leads``: the teacher's input leads in the 12-lead crop (default all 12; fewer
    for a teacher assistant). ``augment``: transforms of the crop before teacher and student.
    ``mkd_class_weights``: (C,) per-class weights of the MKD term. ``corrupt``: wearable
    corruptions of the trained net's input only (the teacher sees the clean crop).

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
    corrupt = corrupt if corrupt is not None and corrupt.active else None

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
        if corrupt is not None:
            x_student = corrupt(jax.random.fold_in(step_rng, 0xC0A), x_student)

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
            inputs = TermInputs(
                spec=loss_spec, logits=logits, features=features, mask_labels=mask_labels,
                teacher_logits=teacher_logits, teacher_features=teacher_features, heads=params["heads"],
                head=head, index=batch["index"], bank=state.memory_bank, rng=clt_rng, gather=gather,
                mkd_class_weights=mkd_class_weights)
            for name in loss_spec.terms:
                terms[name], bank = LOSS_TERMS[name].fn(inputs)
                inputs = dataclasses.replace(inputs, bank=bank)
                total = total + loss_spec.weights[name] * terms[name]
            return total, (terms, mutated["batch_stats"], inputs.bank)

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
    update_fn: Callable  # the same, not jitted (mvkt.dispatch compiles it into its calls)


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
    band_pass: tuple[float, float] | None = None,
) -> Training:
    """The one place a train state and its jitted step are made from a config.

    ``teacher``: ``(teacher_model, teacher_variables)``, needed by kd/mkd/clt/mvkt.
    ``train_labels``: the train split's multi-hot labels (the CLT memory bank keeps them).
    ``optimizer``: ``(tx, schedule)`` instead of the config's (tests use plain SGD).
    ``donate``: donate the state to the step (off when a test reuses a state).
    ``teacher_leads``: the teacher's leads (default all 12; fewer for a teacher assistant).
    ``label_names``: needed for ``config.mkd_class_weights``; ``sampling_rate`` (and the
    shards' ``band_pass``) for the baseline-wander augmentation and the NSTDB noise.
    """
    loss_spec = LossSpec.from_config(config)
    if loss_spec.needs_teacher and teacher is None:
        raise ValueError(f"method {config.method!r} needs teacher=(teacher_model, teacher_variables)")
    student_leads = data_lib.lead_indices(run_config.trained_leads(config))
    model = models.from_config(run_config.net_config(config), num_classes)
    head = models.ProjectionHead(dim=loss_spec.clt_dim) if loss_spec.uses_clt else None
    tx, schedule = optimizer or make_optimizer(config.train, total_steps)
    augment = augment_lib.Augmentation.from_config(config, sampling_rate)
    if config.teacher.cache and loss_spec.needs_teacher and augment.active:
        raise ValueError("config.augment changes the teacher's input every step: precomputed teacher outputs "
                         "cannot follow it; set --config.teacher.cache=False (function matching runs the teacher online)")
    corrupt = augment_lib.Corruption.from_config(config, sampling_rate, band_pass)
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
        mkd_class_weights=run_config.mkd_class_weights(config, label_names or [], num_classes),
        corrupt=corrupt,
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
        update_fn=update_fn,
    )
