"""The four "how to add one" recipes of docs/DESIGN.md, each followed by a toy one through the
public extension point: a net (models.register), a loss term (step.register_loss_term and
register_method), a teacher source (teachers.register_source) and an evaluator
(evaluators.register)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import student as student_config
from experiments.configs import teacher as teacher_config
from helpers import read_metrics, tiny
from mvkt import data as data_lib
from mvkt import evaluators, models, run_dir, teachers, train
from mvkt import parallel as parallel_lib
from mvkt import step as step_lib

CROP = 250


class ToyNet(nn.Module):
    """One strided convolution, concat pooling and a linear head: (logits, pooled features)."""

    num_classes: int
    width: int = 8

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.relu(nn.Conv(self.width, (5,), strides=(2,))(x))
        features = jnp.concatenate([jnp.max(h, axis=1), jnp.mean(h, axis=1)], axis=-1)
        return nn.Dense(self.num_classes)(features), features


def _toy_width(width_mult: float) -> int:
    return max(1, int(round(8 * width_mult)))


@pytest.fixture(scope="module")
def toy_arch() -> str:
    if "toy_net" not in models.REGISTRY:
        models.register("toy_net", models.Architecture(
            build=lambda num_classes, width_mult, dtype: ToyNet(num_classes, width=_toy_width(width_mult)),
            feature_dim=lambda width_mult: 2 * _toy_width(width_mult)))
    return "toy_net"


def _one_step(config, split, *, teacher=None, teacher_leads=None) -> dict:
    """Metrics of one step of ``config`` on the first records of ``split``."""
    parallel = parallel_lib.make_parallelism()
    training = step_lib.build_training(
        config, num_classes=split.num_classes, crop_length=CROP, total_steps=10, parallel=parallel,
        rng=jax.random.PRNGKey(0), train_labels=split.y, teacher=teacher, teacher_leads=teacher_leads,
        label_names=split.label_names)
    index = np.arange(16)
    batch = parallel.to_global({"x": split.crop(index, np.zeros(16, int), CROP),
                                "y": split.y[index].astype(np.float32), "index": index.astype(np.int32)})
    _, metrics = training.update(training.state, batch, parallel.replicate(jax.random.PRNGKey(1)))
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def test_a_registered_net_is_built_by_name_and_trains(ptbxl_sample_shards, toy_arch):
    assert toy_arch in models.ARCHITECTURES
    model = models.create_model(toy_arch, num_classes=5, width_mult=0.5)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, CROP, 1)))
    logits, features = model.apply(variables, jnp.zeros((2, CROP, 1)))
    assert logits.shape == (2, 5) and features.shape == (2, models.feature_dim(toy_arch, width_mult=0.5)) == (2, 8)
    with pytest.raises(ValueError, match="exists already"):
        models.register(toy_arch, models.REGISTRY[toy_arch])
    config = tiny(student_config.get_config(), ptbxl_sample_shards, method="bce", **{"student.arch": toy_arch})
    metrics = _one_step(config, data_lib.open_split(ptbxl_sample_shards, "train"))
    assert np.isfinite(metrics["loss"]) and metrics["loss"] == metrics["loss_bce"]


def logit_l2(*, logits: jax.Array, reduction: str = "mean") -> jax.Array:
    """A toy loss: mean over classes of the squared logits, reduced over the batch."""
    per_record = jnp.mean(jnp.square(logits), axis=-1)
    return {"mean": jnp.mean, "sum": jnp.sum, "none": lambda v: v}[reduction](per_record)


def test_a_registered_loss_term_is_added_to_bce_with_its_weight(ptbxl_sample_shards, toy_arch):
    logits = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    np.testing.assert_allclose(logit_l2(logits=logits), np.mean(logits ** 2), rtol=1e-6)  # the NumPy reference
    np.testing.assert_allclose(logit_l2(logits=logits, reduction="none"), np.mean(logits ** 2, axis=1), rtol=1e-6)
    if "logit_l2" not in step_lib.LOSS_TERMS:
        step_lib.register_loss_term("logit_l2", step_lib.LossTerm(
            fn=lambda inputs: (logit_l2(logits=inputs.logits), inputs.bank), weight_field="alpha",
            needs_teacher=False))
        step_lib.register_method("bce_logit_l2", ["logit_l2"])
    with pytest.raises(ValueError, match="unknown terms"):
        step_lib.register_method("bce_typo", ["logit_l3"])
    config = tiny(student_config.get_config(), ptbxl_sample_shards, method="bce_logit_l2", alpha=0.5,
                  **{"student.arch": toy_arch})
    assert not step_lib.LossSpec.from_config(config).needs_teacher
    metrics = _one_step(config, data_lib.open_split(ptbxl_sample_shards, "train"))
    assert metrics["loss_logit_l2"] > 0
    np.testing.assert_allclose(metrics["loss"], metrics["loss_bce"] + 0.5 * metrics["loss_logit_l2"], rtol=1e-6)


def test_a_registered_teacher_source_hands_the_step_its_teacher(ptbxl_sample_shards, toy_arch):
    def random_teacher(config, *, label_names, folds, parallel):
        """An untrained 12-lead toy net: targets that come from no run folder."""
        model = models.create_model(toy_arch, num_classes=len(label_names))
        variables = parallel.replicate(model.init(jax.random.PRNGKey(3), jnp.zeros((1, CROP, 12))))
        return teachers.TargetSource(model, variables, list(data_lib.LEADS), "random toy teacher")

    if "random_toy" not in teachers.SOURCES:
        teachers.register_source("random_toy", random_teacher)
    config = tiny(student_config.get_config(), ptbxl_sample_shards, method="mkd",
                  **{"teacher.source": "random_toy", "student.arch": toy_arch})
    split = data_lib.open_split(ptbxl_sample_shards, "train")
    source = teachers.provide(config, needs_teacher=True, label_names=split.label_names, folds=None,
                              parallel=parallel_lib.make_parallelism())
    assert source.description == "random toy teacher" and source.batch_targets(np.arange(2), np.zeros(2)) == {}
    metrics = _one_step(config, split, teacher=source.teacher, teacher_leads=source.leads)
    assert metrics["loss_mkd"] > 0 and np.isfinite(metrics["loss"])
    config.teacher.source = "no_such_source"
    with pytest.raises(ValueError, match="not one of"):
        teachers.provide(config, needs_teacher=True, label_names=split.label_names, folds=None,
                         parallel=parallel_lib.make_parallelism())


def test_a_registered_evaluator_is_run_and_logged_at_every_validation(ptbxl_sample_shards, toy_arch, tmp_path):
    def validation_size(context: evaluators.Context) -> evaluators.Evaluator:
        return lambda variables: {"val_records": len(context.val_split),
                                  "val_params": sum(int(np.size(p)) for p in jax.tree.leaves(variables["params"]))}

    if "validation_size" not in evaluators.EVALUATORS:
        evaluators.register("validation_size", validation_size)
    config = tiny(teacher_config.get_config(), ptbxl_sample_shards,
                  **{"teacher.arch": toy_arch, "eval.evaluators": ("val_auc", "validation_size")})
    summary = train.train_and_evaluate(config, tmp_path / "run", progress=False)
    assert summary["finished"]
    rows = [r for r in read_metrics(tmp_path / "run") if "val_records" in r]
    assert len(rows) == 2 and all(r["val_records"] == 16 and r["val_params"] > 0 for r in rows)
    assert all("val_macro_auc" in r for r in rows)  # the default evaluator still selects checkpoints
    model, _, run_config, _, _ = run_dir.load_trained_model(tmp_path / "run")
    assert run_config.trains == "teacher" and isinstance(model, ToyNet)
    config.eval.evaluators = ("val_auc", "typo")
    with pytest.raises(ValueError, match=r"unknown \['typo'\]"):
        train.train_and_evaluate(config, tmp_path / "other", progress=False)
