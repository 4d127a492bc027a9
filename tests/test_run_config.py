"""mvkt.run_config: every accepted form of the list-, dict- and string-valued config fields,
the upgrade of run folders written before config.teacher, and which modules the
prediction side imports."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from experiments.configs import student as student_config
from experiments.configs import teacher as teacher_config
from helpers import read_metrics, tiny
from mvkt import data as data_lib
from mvkt import evaluate, run_config, run_dir, train

REPO = pathlib.Path(__file__).resolve().parents[1]
LABELS = ["CD", "HYP", "MI", "NORM", "STTC"]


def test_leads_folds_weights_and_teacher_runs_parse_from_strings_lists_and_dicts():
    assert run_config.parse_leads("I, II ,V2") == run_config.parse_leads(["I", "II", "V2"]) == ["I", "II", "V2"]
    assert run_config.parse_leads(("I,II",)) == ["I", "II"]  # a tuple field given I,II on the command line
    assert run_config.parse_leads("all") == run_config.parse_leads(["all"]) == list(data_lib.LEADS)
    with pytest.raises(ValueError, match="duplicate leads"):
        run_config.parse_leads(["I", "I"])

    data = ml_collections.ConfigDict({"train_folds": "1,2", "val_folds": [3], "test_folds": ("4",)})
    assert run_config.fold_splits(data) == {"train": [1, 2], "val": [3], "test": [4]}
    assert run_config.fold_splits(ml_collections.ConfigDict({"train_folds": "", "val_folds": (),
                                                             "test_folds": ""})) is None
    with pytest.raises(ValueError, match="set all of"):
        run_config.fold_splits(ml_collections.ConfigDict({"train_folds": [1], "val_folds": "", "test_folds": ""}))
    with pytest.raises(ValueError, match="must be integers"):
        run_config.fold_splits(ml_collections.ConfigDict({"train_folds": "1,x", "val_folds": "2", "test_folds": "3"}))

    for value in ("HYP:0,STTC:0.5", {"HYP": 0, "STTC": 0.5}):
        config = ml_collections.ConfigDict({"mkd_class_weights": value})
        np.testing.assert_array_equal(run_config.mkd_class_weights(config, LABELS, 5), [1, 0, 1, 1, 0.5])
    with pytest.raises(ValueError, match="not one of the labels"):
        run_config.mkd_class_weights(ml_collections.ConfigDict({"mkd_class_weights": {"XX": 1}}), LABELS, 5)

    assert run_config.path_list("runs/A, runs/B") == run_config.path_list(("runs/A", "runs/B")) == ["runs/A", "runs/B"]
    assert run_config.path_list(pathlib.Path("runs/A")) == ["runs/A"]


def _legacy_layout(config: dict) -> dict:
    """A config.json as written before config.teacher: its fields at the top level, the
    trained net (teachers too) in student.*, no config.trains."""
    old = {k: v for k, v in config.items() if k not in ("teacher", "trains")}
    teacher = config["teacher"]
    old["teacher_workdir"] = ",".join(teacher["runs"])
    old["teacher_cache"], old["teacher_cache_stride_seconds"] = teacher["cache"], teacher["cache_stride_seconds"]
    old["teacher_cross_fit"], old["allow_unfinished_teacher"] = teacher["cross_fit"], teacher["allow_unfinished"]
    if config["trains"] == "teacher":
        old["student"] = {f: teacher[f] for f in run_config.NET_FIELDS}
    old["eval"] = {k: v for k, v in config["eval"].items() if k != "evaluators"}
    return old


def test_run_folders_of_the_old_config_layout_resume_train_students_and_evaluate(ptbxl_sample_shards, tmp_path):
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    config = tiny(teacher_config.get_config(), ptbxl_sample_shards)
    train.train_and_evaluate(tiny(teacher_config.get_config(), ptbxl_sample_shards, **{"train.stop_at_step": 2}),
                             teacher, progress=False)
    path = teacher / run_dir.CONFIG_FILE
    path.write_text(json.dumps(_legacy_layout(json.loads(path.read_text()))))
    upgraded = run_dir.load_config(teacher)
    assert upgraded.trains == "student" and upgraded.student.leads == "all" and list(upgraded.teacher.runs) == []

    summary = train.train_and_evaluate(config, teacher, progress=False)  # today's command resumes it
    assert summary["finished"] and summary["step"] == 4
    assert [r["step"] for r in read_metrics(teacher) if "loss" in r] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="different config"):  # and still refuses a changed one
        train.train_and_evaluate(tiny(teacher_config.get_config(), ptbxl_sample_shards, **{"teacher.leads": "I"}),
                                 teacher, progress=False)

    student_cfg = tiny(student_config.get_config(), ptbxl_sample_shards, **{"teacher.runs": (str(teacher),),
                                                                            "train.epochs": 1})
    train.train_and_evaluate(student_cfg, student, progress=False)
    path = student / run_dir.CONFIG_FILE
    path.write_text(json.dumps(_legacy_layout(json.loads(path.read_text()))))
    assert json.loads(path.read_text())["teacher_workdir"] == str(teacher)
    assert train.train_and_evaluate(student_cfg, student, progress=False)["resumed_finished"]
    result = evaluate.evaluate_run(student, split="test", n_resamples=20)
    assert np.isfinite(result["macro_auc"])


def test_prediction_export_and_evaluation_do_not_import_the_trainer():
    code = ("import sys, experiments.predict, experiments.export, experiments.evaluate; "
            "loaded = sorted(m for m in ('mvkt.train', 'mvkt.step', 'mvkt.teachers', 'optax') if m in sys.modules); "
            "assert not loaded, loaded")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
