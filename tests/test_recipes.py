"""Transfer recipes as config options, on the embedded PTB-XL sample: function matching
(augmentations identical for teacher and student), lead-dropout teachers, teacher
assistants on fewer leads, per-class distillation weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import student as student_config
from experiments.configs import teacher as teacher_config
from helpers import mkd_step_against_by_hand, read_metrics, tiny
from mvkt import step as step_lib
from mvkt import augment as augment_lib
from mvkt import run_config
from mvkt import teachers as teachers_lib
from mvkt import data as data_lib
from mvkt import input_pipeline, run_dir, train
from mvkt import parallel as parallel_lib


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return tiny_teacher


def test_augmentations_do_what_they_say():
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 250, 12))
    y = jnp.asarray(np.eye(5)[np.arange(8) % 5], jnp.float32)
    assert not augment_lib.Augmentation().active
    dropped, _, _ = augment_lib.Augmentation(lead_dropout=1.0, keep_leads=(0,))(jax.random.PRNGKey(1), x, y)
    np.testing.assert_array_equal(dropped[..., 0], x[..., 0])
    assert float(jnp.abs(dropped[..., 1:]).max()) == 0.0
    mixed_x, mixed_y, mask_y = augment_lib.Augmentation(mixup_alpha=0.4)(jax.random.PRNGKey(2), x, y)
    np.testing.assert_allclose(mixed_y.sum(1), 1.0, rtol=1e-6)  # convex combinations of one-hot rows
    assert set(np.unique(np.asarray(mask_y))) <= {0.0, 1.0}  # the dominant record's labels
    assert not np.allclose(mixed_x, x)
    for kwargs in ({"amplitude_scale_std": 0.1}, {"noise_std": 0.05}, {"baseline_wander": 0.2}):
        out, out_y, _ = augment_lib.Augmentation(**kwargs)(jax.random.PRNGKey(3), x, y)
        assert out.shape == x.shape and np.isfinite(out).all() and not np.allclose(out, x)
        np.testing.assert_array_equal(out_y, y)


def test_function_matching_feeds_the_teacher_the_students_augmented_input(ptbxl_sample_shards, teacher):
    """The step's MKD term equals MKD between the student and the teacher on the same
    augmented crop (recomputed outside the step from the same random streams)."""
    config = tiny(student_config.get_config(), ptbxl_sample_shards, method="mkd",
                  **{"augment.mixup_alpha": 0.4, "augment.noise_std": 0.05, "augment.amplitude_scale_std": 0.1})
    augment = augment_lib.Augmentation.from_config(config, 100)

    def inputs(step_rng, batch):
        x, _, _ = augment(jax.random.fold_in(step_rng, 0xA06), jnp.asarray(batch["x"]), jnp.asarray(batch["y"]))
        return x[..., :1], x  # the same augmented crop for both

    in_step, expected = mkd_step_against_by_hand(config, ptbxl_sample_shards, teacher, inputs)
    np.testing.assert_allclose(in_step, expected, rtol=1e-4)


def test_lead_dropout_teacher_and_a_teacher_assistant_train(ptbxl_sample_shards, teacher, tmp_path):
    dropout_teacher = tmp_path / "dropout_teacher"
    config = tiny(teacher_config.get_config(), ptbxl_sample_shards,
                  **{"train.epochs": 1, "augment.lead_dropout": 0.5, "augment.lead_dropout_keep": "I"})
    assert train.train_and_evaluate(config, dropout_teacher, progress=False)["finished"]

    assistant = tmp_path / "assistant"  # I, II, V2: between the 12-lead teacher and a lead-I student
    config = tiny(student_config.get_config(), ptbxl_sample_shards, **{"teacher.runs": (str(teacher),)},
                  **{"train.epochs": 1, "student.leads": "I,II,V2"})
    assert train.train_and_evaluate(config, assistant, progress=False)["finished"]
    student = tiny(student_config.get_config(), ptbxl_sample_shards, **{"teacher.runs": (str(assistant),)},
                   **{"train.epochs": 1})
    assert train.train_and_evaluate(student, tmp_path / "student", progress=False)["finished"]
    wrong = tiny(student_config.get_config(), ptbxl_sample_shards, **{"teacher.runs": (str(assistant),)},
                 **{"train.epochs": 1, "student.leads": "V1"})
    with pytest.raises(ValueError, match=r"a teacher needs all of the student's leads \['V1'\]"):
        train.train_and_evaluate(wrong, tmp_path / "wrong", progress=False)


def test_per_class_distillation_weights(ptbxl_sample_shards, teacher, tmp_path):
    split = data_lib.open_split(ptbxl_sample_shards, "train")
    config = tiny(student_config.get_config(), ptbxl_sample_shards, method="mkd")
    config.mkd_class_weights = "CD:0,HYP:0.5"
    np.testing.assert_array_equal(run_config.mkd_class_weights(config, split.label_names, 5), [0, 0.5, 1, 1, 1])
    config.mkd_class_weights = ",".join(f"{name}:0" for name in split.label_names)
    config.teacher.runs = (str(teacher),)
    config.train.epochs = 1
    train.train_and_evaluate(config, tmp_path / "s", progress=False)
    assert all(r["loss_mkd"] == 0 for r in run_dir.metric_rows(tmp_path / "s") if "loss_mkd" in r)
    config.mkd_class_weights = "AFIB:0"
    with pytest.raises(ValueError, match="names 'AFIB', not one of the labels"):
        run_config.mkd_class_weights(config, split.label_names, 5)


def test_a_cached_teacher_cannot_follow_augmented_inputs(ptbxl_sample_shards, teacher, tmp_path):
    config = tiny(student_config.get_config(), ptbxl_sample_shards, **{"teacher.runs": (str(teacher),), "teacher.cache": True},
                  **{"data.random_crop": False, "augment.mixup_alpha": 0.4})
    with pytest.raises(ValueError, match="precomputed teacher outputs cannot follow it"):
        train.train_and_evaluate(config, tmp_path / "s", progress=False)


def test_a_teacher_ensemble_distils_the_mean_of_its_members(ptbxl_sample_shards, teacher, tmp_path):
    second = tmp_path / "teacher_seed1"
    train.train_and_evaluate(tiny(teacher_config.get_config(), ptbxl_sample_shards, seed=1, **{"train.epochs": 1}),
                             second, progress=False)
    parallel = parallel_lib.make_parallelism()
    config = tiny(student_config.get_config(), ptbxl_sample_shards, **{"teacher.runs": tuple(run_config.path_list(f"{teacher},{second}"))})
    labels = data_lib.open_split(ptbxl_sample_shards, "train").label_names
    model, variables, _, _ = teachers_lib.ensemble(teachers_lib.load_members(config, labels, parallel), parallel)
    x = jnp.asarray(data_lib.open_split(ptbxl_sample_shards, "val").crop(np.arange(8), 0, 250))
    members = [run_dir.load_trained_model(w, parallel=parallel) for w in (teacher, second)]
    logits, features = model.apply(variables, x, train=False)
    expected = np.mean([m.apply(v, x, train=False)[0] for m, v, *_ in members], axis=0)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(features, members[0][0].apply(members[0][1], x, train=False)[1], rtol=1e-5, atol=1e-6)
    for cache in (False, True):  # online and with the grid cache
        run = tiny(student_config.get_config(), ptbxl_sample_shards, **{"teacher.runs": tuple(run_config.path_list(f"{teacher},{second}"))},
                   **{"teacher.cache": cache, "teacher.cache_stride_seconds": 0.25, "train.epochs": 1})
        assert train.train_and_evaluate(run, tmp_path / f"student_{cache}", progress=False)["finished"]
    assistant = tmp_path / "assistant"
    train.train_and_evaluate(tiny(student_config.get_config(), ptbxl_sample_shards, **{"teacher.runs": (str(teacher),)},
                                  **{"train.epochs": 1, "student.leads": "I,II"}), assistant, progress=False)
    mixed = tiny(student_config.get_config(), ptbxl_sample_shards, **{"teacher.runs": tuple(run_config.path_list(f"{teacher},{assistant}"))})
    with pytest.raises(ValueError, match="the teachers of an ensemble must share their leads"):
        train.train_and_evaluate(mixed, tmp_path / "mixed", progress=False)


def test_cross_fitted_targets_come_from_the_teacher_that_never_saw_the_record(ptbxl_sample_shards, tmp_path):
    def with_folds(config, train_folds):
        config.data.train_folds, config.data.val_folds, config.data.test_folds = train_folds, "9", "10"
        return config

    halves = {"a": "1,2,3,4", "b": "5,6,7,8"}
    teachers = {}
    for name, part in halves.items():
        teachers[name] = tmp_path / f"teacher_{name}"
        train.train_and_evaluate(with_folds(tiny(teacher_config.get_config(), ptbxl_sample_shards,
                                                 **{"train.epochs": 1, "train.batch_size": 16}), part),
                                 teachers[name], progress=False)
    config = with_folds(tiny(student_config.get_config(), ptbxl_sample_shards, **{"train.epochs": 1}),
                        "1,2,3,4,5,6,7,8")
    config.teacher.runs = tuple(run_config.path_list(f"{teachers['a']},{teachers['b']}"))
    config.teacher.cross_fit = True
    with pytest.raises(ValueError, match="teacher.cross_fit needs --config.teacher.cache=True"):
        train.train_and_evaluate(config, tmp_path / "no_cache", progress=False)
    config.teacher.cache, config.teacher.cache_stride_seconds = True, 0.25

    parallel = parallel_lib.make_parallelism()
    folds = run_config.fold_splits(config.data)
    split = data_lib.open_split(ptbxl_sample_shards, "train", folds)
    members = teachers_lib.load_members(config, split.label_names, parallel)
    seen = teachers_lib.check_cross_fit(members, folds, config)
    loader = input_pipeline.TrainBatches(split, global_batch_size=32, crop_length=250, random_crop=True, seed=0,
                                         crop_grid=25)
    cache = teachers_lib.cross_fitted_cache(members, seen, loader, batch_size=64, parallel=parallel,
                                     teacher_leads=list(range(12)))
    stats = [info["preprocessing"]["standardization"] for _, _, info, _ in members]
    # Each teacher's standardisation is fitted on its half, not on the student's eight folds.
    assert stats[0]["mean"] != split.manifest["preprocessing"]["standardization"]["mean"]
    single = [teachers_lib.teacher_cache(m, v, loader, batch_size=64, parallel=parallel, standardization=st)
              for (m, v, _, _), st in zip(members, stats)]
    # ...and it sees its own training records exactly as it saw them in training.
    own = data_lib.open_split(ptbxl_sample_shards, "train", {**folds, "train": [1, 2, 3, 4]})
    theirs = np.flatnonzero(split.folds <= 4)
    np.testing.assert_array_equal(split.record_ids[theirs], own.record_ids)
    np.testing.assert_allclose(data_lib.as_standardized(split, stats[0]).crop(theirs, 0, 250),
                               own.crop(np.arange(len(own)), 0, 250), rtol=1e-4, atol=1e-4)
    for i, fold in enumerate(split.folds):
        other = single[1] if fold <= 4 else single[0]  # the teacher trained on the other half
        np.testing.assert_allclose(cache.logits[i], other.logits[i], rtol=1e-6)
        np.testing.assert_allclose(cache.features[i], other.features[i], rtol=1e-6)
    assert train.train_and_evaluate(config, tmp_path / "student", progress=False)["finished"]

    config.teacher.runs = tuple(run_config.path_list(f"{teachers['a']},{teachers['a']}"))
    with pytest.raises(ValueError, match=r"every teacher saw fold\(s\) \[1, 2, 3, 4\]"):
        train.train_and_evaluate(config, tmp_path / "uncovered", progress=False)


def test_every_named_recipe_builds_valid_teacher_and_student_configs(tmp_path):
    """Study recipes (experiments.study.TRANSFER_METHODS) resolve to configs whose overrides
    exist, with the student's leads filled in; a recipe's own teacher is a BCE run (12 leads
    unless it is a teacher assistant)."""
    from experiments import study

    base = study.base_config(data_dir=tmp_path, arch="resnet1d_wang", epochs=1, batch_size=32, seed=3)
    base.data.train_folds, base.data.val_folds, base.data.test_folds = "1,2,3,4,5,6,7,8", "9", "10"
    for name, recipe in study.TRANSFER_METHODS.items():
        for leads in ("I", "I,II"):
            runs = recipe.teacher_runs(base, leads)
            assert len(runs) == recipe.ensemble * max(recipe.cross_fit, 1)
            assert [r.config.seed for _, r in runs] == [s for s in range(3, 3 + recipe.ensemble)
                                                         for _ in range(max(recipe.cross_fit, 1))]
            group, teacher = runs[0]
            assert teacher.name == f"{group}_seed3"
            assert teacher.config.method == "bce"
            assert teacher.config.trains == "teacher"
            assert teacher.config.teacher.leads == recipe.teacher.get("teacher.leads", "all")
            if recipe.cross_fit:
                parts = [r.config.data.train_folds.split(",") for _, r in runs]
                assert sorted(sum(parts, [])) == sorted(base.data.train_folds.split(","))  # disjoint, complete
                assert [g for g, _ in runs] == [f"teacher_part{k}of{recipe.cross_fit}"
                                                 for k in range(1, recipe.cross_fit + 1)]
                assert all(r.config.data.val_folds == "9" and r.config.data.test_folds == "10" for _, r in runs)
            else:
                assert group == recipe.teacher_name
                assert all(r.config.data.train_folds == base.data.train_folds for _, r in runs)
            student = study.student_run(base, method=recipe.method, leads=leads, teacher_dir=tmp_path,
                                        clt_variant=recipe.clt_variant, name=name,
                                        overrides=study._with_leads(recipe.student, leads))
            assert student.name == f"{name}_leads{leads.replace(',', '-')}_seed3"
            assert student.config.method == recipe.method and student.config.student.leads == leads
            if "augment.lead_dropout_keep" in recipe.teacher:
                assert teacher.config.augment.lead_dropout_keep == leads
            for key, value in recipe.student.items():
                assert hyper_get(student.config, key) == value
    with pytest.raises(ValueError, match="names its teacher"):
        study.Recipe("mkd", teacher={"augment.lead_dropout": 0.5})
    with pytest.raises(ValueError, match="at least 2"):
        study.Recipe("kd", cross_fit=1)
    base.data.train_folds = ""
    with pytest.raises(ValueError, match="cross-fitted teachers need explicit training folds"):
        study.TRANSFER_METHODS["kd_cross_fit2"].teacher_runs(base, "I")
    with pytest.raises(ValueError, match="unknown config field"):
        study.student_run(base, method="mkd", leads="I", teacher_dir=tmp_path, overrides={"augment.mixup": 1.0})


def hyper_get(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


def test_the_official_recipe_preset_trains_with_its_optimizer_and_schedule(ptbxl_sample_shards, tmp_path):
    """experiments/configs/paper.py as in QINYZz/MVKT-ECG, run on the sample with the tests'
    small net for 2 epochs: Adam with L2 weight decay, the official per-epoch learning rate
    (0.001 * (epoch + 1) in the first 15 epochs), no clipping, whole 10-s records."""
    from experiments.configs import paper, paper_student

    teacher, student = paper.get_config(), paper_student.get_config()
    for config in (teacher, student):
        assert (config.train.optimizer, config.train.schedule, config.train.batch_size, config.train.epochs) == (
            "adam", "mvkt_official", 32, 100)
        assert config.data.crop_seconds == 10.0 and config.train.grad_clip_norm == 0.0
        assert run_config.net_config(config).arch == "xresnet1d101"
    assert (teacher.trains, student.method, student.clt.variant) == ("teacher", "mvkt", "memory_bank")
    config = tiny(paper.get_config(), ptbxl_sample_shards)  # the tests' net, 2 epochs of 2 steps
    train.train_and_evaluate(config, tmp_path / "T", progress=False)
    rates = {row["step"]: row["learning_rate"] for row in read_metrics(tmp_path / "T") if "learning_rate" in row}
    # learning_rate is logged for the step that produced the row: steps 1-2 are epoch 0, 3-4 epoch 1
    assert rates[1] == pytest.approx(0.001) and rates[3] == pytest.approx(0.002)
    schedule = step_lib.make_schedule(paper.get_config().train, total_steps=100 * 10)
    assert [float(schedule(10 * e)) for e in (0, 14, 15, 39, 40, 69, 70)] == pytest.approx(
        [0.001, 0.015, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5])


def test_adam_is_torch_adam_with_l2_weight_decay():
    """train.optimizer=adam: the gradient gets weight_decay * param before Adam's moments
    (torch.optim.Adam), unlike adamw's decoupled decay; checked against the update by hand."""
    import ml_collections

    cfg = ml_collections.ConfigDict({"learning_rate": 0.1, "schedule": "constant", "grad_clip_norm": 0.0,
                                     "optimizer": "adam", "weight_decay": 0.5, "epochs": 1})
    tx, _ = step_lib.make_optimizer(cfg, total_steps=10)
    params = {"w": jnp.asarray([1.0, -2.0])}
    state = tx.init(params)
    p, m, v = np.array([1.0, -2.0]), np.zeros(2), np.zeros(2)
    for t, g in enumerate([np.array([0.3, 0.1]), np.array([-0.2, 0.4])], start=1):
        updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
        params = {"w": params["w"] + updates["w"]}
        grad = g + 0.5 * p
        m, v = 0.9 * m + 0.1 * grad, 0.999 * v + 0.001 * grad ** 2
        p = p - 0.1 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    np.testing.assert_allclose(np.asarray(params["w"]), p, rtol=1e-5)  # float32 against float64
