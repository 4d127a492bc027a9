"""Cross-validation on the embedded PTB-XL sample: fold splits re-standardised on their
training folds without copies, teachers tied to their round, pooled out-of-fold results.

The full acceptance command (all 10 rounds, ~3.5 min on 2 cores) is run by hand; here two
rounds keep CI short while checking the same invariants on the records they score."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import crossval
from experiments import report as report_lib
from experiments import study
from experiments.configs import student as student_config
from experiments.configs import teacher as teacher_config
from helpers import TEST_ARCH, tiny
from mvkt import run_config
from mvkt import data as data_lib
from mvkt import train

SAMPLE_FOLDS = list(range(1, 11))


def test_round_folds_cover_every_fold_once_as_test_and_as_validation():
    rounds = [crossval.round_folds(SAMPLE_FOLDS, r) for r in range(10)]
    assert [r["test"] for r in rounds] == [[f] for f in SAMPLE_FOLDS]
    assert sorted(r["val"][0] for r in rounds) == SAMPLE_FOLDS
    for r in rounds:
        assert sorted(r["train"] + r["val"] + r["test"]) == SAMPLE_FOLDS and len(r["train"]) == 8


def test_fold_splits_are_standardised_on_their_training_folds(ptbxl_sample_shards):
    own = {"train": list(range(1, 9)), "val": [9], "test": [10]}
    for split in data_lib.SPLITS:  # the shards' own folds: the stored values, up to float rounding
        a, b = data_lib.open_split(ptbxl_sample_shards, split), data_lib.open_split(ptbxl_sample_shards, split, own)
        assert list(a.record_ids) == list(b.record_ids)
        np.testing.assert_allclose(b.crop(np.arange(len(a)), 0, 250), a.crop(np.arange(len(a)), 0, 250), atol=1e-5)
    folds = crossval.round_folds(SAMPLE_FOLDS, 0)
    train_split = data_lib.open_split(ptbxl_sample_shards, "train", folds)
    x = np.concatenate([train_split.record(i) for i in range(len(train_split))]).astype(np.float64)
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(0), 1, atol=1e-5)
    test_split = data_lib.open_split(ptbxl_sample_shards, "test", folds)
    assert set(test_split.folds.tolist()) == {1}
    assert test_split.manifest["preprocessing"]["standardization"]["fitted_on"] == f"folds {folds['train']}"
    # The round's statistics in source units reproduce the re-standardised values from raw ones.
    stored = data_lib.open_split(ptbxl_sample_shards, "train")
    raw = stored.record(0) * np.float32(stored.manifest["preprocessing"]["standardization"]["std"]) + np.float32(
        stored.manifest["preprocessing"]["standardization"]["mean"])
    stats = train_split.manifest["preprocessing"]["standardization"]
    i = list(train_split.record_ids).index(stored.record_ids[0])
    np.testing.assert_allclose((raw - stats["mean"]) / stats["std"], train_split.record(i), atol=1e-4)


def test_a_student_refuses_a_teacher_of_another_round(ptbxl_sample_shards, tmp_path):
    def on_round(config, r):
        folds = crossval.round_folds(SAMPLE_FOLDS, r)
        config.data.train_folds, config.data.val_folds, config.data.test_folds = (
            ",".join(map(str, folds[s])) for s in data_lib.SPLITS)
        return config

    teacher = tmp_path / "teacher"
    train.train_and_evaluate(on_round(tiny(teacher_config.get_config(), ptbxl_sample_shards,
                                           **{"train.epochs": 1}), 0), teacher, progress=False)
    student = on_round(tiny(student_config.get_config(), ptbxl_sample_shards, **{"teacher.runs": (str(teacher),)},
                            **{"train.epochs": 1}), 1)
    with pytest.raises(ValueError, match="use the teacher of the same cross-validation round"):
        train.train_and_evaluate(student, tmp_path / "student", progress=False)
    with pytest.raises(ValueError, match="set all of data.train_folds"):
        run_config.fold_splits(tiny(teacher_config.get_config(), ptbxl_sample_shards, **{"data.train_folds": "1,2"}).data)


def test_crossval_pools_out_of_fold_scores_and_reruns_train_nothing(ptbxl_sample_shards, tmp_path):
    workdir = tmp_path / "cv"
    kwargs = dict(workdir=workdir, data_dir=ptbxl_sample_shards, methods=["bce", "mvkt"], seeds=[0], rounds=[0, 8],
                  epochs=1, batch_size=16, arch=TEST_ARCH, width_mult=0.25, n_resamples=50, progress=False)
    report = crossval.run_crossval(**kwargs)
    out = json.loads((workdir / "crossval.json").read_text())
    scored = {f: len(data_lib.open_split(ptbxl_sample_shards, "test", crossval.round_folds(SAMPLE_FOLDS, r)))
              for f, r in ((1, 0), (9, 8))}
    for method in ("teacher", "bce", "mvkt"):
        result = out["methods"][method]
        assert result["num_records_scored"] == sum(scored.values())  # each record of the test folds once
        assert np.isfinite(result["pooled_macro_auc"])
        assert set(result["per_round"]) == {"0", "8"}
    ids = np.load(workdir / "oof" / "mvkt_seed0" / "scores_oof.npz")["record_ids"]
    assert len(set(ids.tolist())) == len(ids)
    assert set(out["methods"]["mvkt"]["vs_bce"]) >= {"difference", "ci", "p_value"}
    assert report.exists() and "subset" in report.read_text() and (workdir / "plots" / "crossval.png").exists()
    # The size warning counts the records the pooled numbers rest on, not the shards' test split.
    assert f"only {sum(scored.values())} records scored" in report.read_text()
    first_run = workdir / "runs" / "round0" / "bce_leadsI_seed0"
    assert "Warning" not in report_lib.data_section(first_run, records_scored=1819)[0]
    before = {p: p.read_text() for p in workdir.glob("runs/round*/*/metrics.jsonl")}
    crossval.run_crossval(**kwargs)
    assert {p: p.read_text() for p in workdir.glob("runs/round*/*/metrics.jsonl")} == before


def test_pilot_mode_scores_only_validation_folds_and_trains_recipe_teachers_once(ptbxl_sample_shards, tmp_path):
    """--split=val: recipes compared on validation folds, test folds never scored; a recipe
    with its own teacher (lead dropout) trains that teacher once per round."""
    workdir = tmp_path / "pilot"
    crossval.run_crossval(workdir=workdir, data_dir=ptbxl_sample_shards, methods=["bce", "kd_lead_dropout_teacher"],
                          seeds=[0], rounds=[9, 7], epochs=1, batch_size=16, arch=TEST_ARCH, width_mult=0.25, n_resamples=50,
                          split="val", progress=False)
    out = json.loads((workdir / "crossval_val.json").read_text())
    assert out["split"] == "val" and not (workdir / "crossval.json").exists()
    assert set(out["methods"]) == {"teacher", "teacher_lead_dropout", "bce", "kd_lead_dropout_teacher"}
    scored = sum(len(data_lib.open_split(ptbxl_sample_shards, "val", crossval.round_folds(SAMPLE_FOLDS, r)))
                 for r in (9, 7))
    for result in out["methods"].values():
        assert result["num_records_scored"] == scored and np.isfinite(result["pooled_macro_auc"])
    assert [out["methods"]["bce"]["per_round"][r]["scored_fold"] for r in ("9", "7")] == [1, 9]
    assert not list(workdir.glob("runs/**/scores_test.npz")) and len(list(workdir.glob("runs/**/scores_val.npz"))) == 8
    assert "validation" in (workdir / "report_val.md").read_text()
    student = json.loads((workdir / "runs" / "round9" / "kd_lead_dropout_teacher_leadsI_seed0" / "config.json")
                         .read_text())
    assert [r[-len("round9/teacher_lead_dropout_seed0"):] for r in student["teacher"]["runs"]] == [
        "round9/teacher_lead_dropout_seed0"]
    teacher = json.loads((workdir / "runs" / "round9" / "teacher_lead_dropout_seed0" / "config.json").read_text())
    assert (teacher["augment"]["lead_dropout"], teacher["augment"]["lead_dropout_keep"]) == (0.5, "I")
    with pytest.raises(ValueError, match="teacher_dir cannot be used"):
        crossval.run_crossval(workdir=workdir, data_dir=ptbxl_sample_shards, methods=["bce"], seeds=[0], rounds=[0],
                              epochs=1, teacher_dir=str(workdir), progress=False)


def test_an_ensemble_recipe_uses_the_next_seeds_teacher_and_keeps_the_groups_of_every_seed(
        ptbxl_sample_shards, tmp_path):
    """kd_ensemble2: the student of seed s distils the mean of the teachers of seeds s and s+1;
    seed 0 reuses the teacher that seed 1 trains anyway, and no seed adds a group of its own."""
    workdir = tmp_path / "ensemble"
    crossval.run_crossval(workdir=workdir, data_dir=ptbxl_sample_shards, methods=["bce", "kd_ensemble2"],
                          seeds=[0, 1], rounds=[9], epochs=1, batch_size=16, arch=TEST_ARCH, width_mult=0.25, n_resamples=20,
                          split="val", progress=False)
    out = json.loads((workdir / "crossval_val.json").read_text())
    assert set(out["methods"]) == {"teacher", "bce", "kd_ensemble2"}
    round9 = workdir / "runs" / "round9"
    assert sorted(p.name for p in round9.glob("teacher_seed*")) == ["teacher_seed0", "teacher_seed1", "teacher_seed2"]
    for seed in (0, 1):
        student = json.loads((round9 / f"kd_ensemble2_leadsI_seed{seed}" / "config.json").read_text())
        assert student["teacher"]["runs"] == [str(round9 / f"teacher_seed{seed}"), str(round9 / f"teacher_seed{seed + 1}")]
    with pytest.raises(ValueError, match="at least 1"):
        study.Recipe("kd", ensemble=0)


def test_a_cross_fit_recipe_trains_teachers_on_disjoint_halves_of_the_round(ptbxl_sample_shards, tmp_path):
    """kd_cross_fit2: each round trains two teachers on alternate training folds (same
    validation and test folds), reports them as groups, and the student distils from both
    through the grid cache, each record's targets from the teacher that never saw it."""
    workdir = tmp_path / "cross_fit"
    crossval.run_crossval(workdir=workdir, data_dir=ptbxl_sample_shards, methods=["bce", "kd_cross_fit2"],
                          seeds=[0], rounds=[9], epochs=1, batch_size=16, arch=TEST_ARCH, width_mult=0.25, n_resamples=20,
                          split="val", progress=False)
    out = json.loads((workdir / "crossval_val.json").read_text())
    assert list(out["methods"]) == ["teacher", "teacher_part1of2", "teacher_part2of2", "bce", "kd_cross_fit2"]
    round9 = workdir / "runs" / "round9"
    main = json.loads((round9 / "teacher_seed0" / "config.json").read_text())["data"]
    parts = [json.loads((round9 / f"teacher_part{k}of2_seed0" / "config.json").read_text())["data"]
             for k in (1, 2)]
    halves = [set(p["train_folds"].split(",")) for p in parts]
    assert not halves[0] & halves[1] and halves[0] | halves[1] == set(main["train_folds"].split(","))
    assert all((p["val_folds"], p["test_folds"]) == (main["val_folds"], main["test_folds"]) for p in parts)
    student = json.loads((round9 / "kd_cross_fit2_leadsI_seed0" / "config.json").read_text())
    assert student["teacher"]["runs"] == [str(round9 / "teacher_part1of2_seed0"), str(round9 / "teacher_part2of2_seed0")]
    assert student["teacher"]["cross_fit"] and student["teacher"]["cache"]
    assert out["methods"]["kd_cross_fit2"]["num_records_scored"] == out["methods"]["bce"]["num_records_scored"]


def test_an_undefined_pooled_auc_is_named_and_the_report_still_written(ptbxl_sample_shards, tmp_path):
    """The sample's pilot rounds 0 and 1 validate on folds 2 and 3: 16 records, all NORM."""
    workdir = tmp_path / "undefined"
    crossval.run_crossval(workdir=workdir, data_dir=ptbxl_sample_shards, methods=["bce"], seeds=[0], rounds=[0, 1],
                          epochs=1, batch_size=16, arch=TEST_ARCH, width_mult=0.25, n_resamples=20, split="val",
                          progress=False)
    out = json.loads((workdir / "crossval_val.json").read_text())
    bce = out["methods"]["bce"]
    assert bce["pooled_macro_auc"] is None and bce["num_records_scored"] == 16
    assert bce["undefined"] == ("bce: the pooled validation-fold macro-AUC of rounds [0, 1] is undefined: no class has "
                                "both positive and negative records among the 16 records scored")
    report = (workdir / "report_val.md").read_text()
    assert f"**Undefined:** {bce['undefined']}." in report and "| bce | 16 | undefined" in report
