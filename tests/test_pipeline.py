"""The one-command pipeline and evaluation CLI on the embedded real PTB-XL sample."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from experiments import pipeline, study
from mvkt import evaluate

from helpers import TEST_ARCH

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--epochs=1", "--width_mult=0.25", "--bootstrap_resamples=50"]


def _run(module, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline") / "run"
    result = _run("experiments.pipeline", f"--workdir={workdir}", *TINY)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


def _table_aucs(report: str) -> dict[str, float]:
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        # Comparison-table rows: method | seeds | macro-AUC | CI | ...
        if len(cells) > 4 and cells[1].isdigit() and re.fullmatch(r"\d\.\d{4}", cells[2]):
            rows[cells[0]] = float(cells[2])
    return rows


def test_pipeline_writes_report_with_finite_aucs(pipeline_dir):
    report = (pipeline_dir / "report.md").read_text()
    aucs = _table_aucs(report)
    assert set(aucs) == {"teacher (12-lead)", "BCE student (I)", "MVKT student (I)"}
    assert all(math.isfinite(v) and 0 <= v <= 1 for v in aucs.values())
    assert "no meaningful accuracy" in report
    assert "difference vs BCE student (I)" in report
    for png in ("roc_curves.png", "auc_gain.png"):
        assert (pipeline_dir / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((pipeline_dir / "report.json").read_text())
    mvkt_row = next(r for r in data["rows"] if r["method"] == "MVKT student (I)")
    lo, hi = mvkt_row["vs_baseline"]["ci"]
    assert lo <= mvkt_row["vs_baseline"]["difference"] <= hi


def test_rerun_of_finished_pipeline_trains_nothing(pipeline_dir):
    metrics = sorted(pipeline_dir.glob("runs/*/metrics.jsonl"))
    assert len(metrics) == 3
    before = {p: p.read_text() for p in metrics}
    evals = {p: p.stat().st_mtime_ns for p in pipeline_dir.glob("runs/*/eval_test.json")}
    result = _run("experiments.pipeline", f"--workdir={pipeline_dir}", *TINY)
    assert result.returncode == 0, result.stderr[-4000:]
    assert {p: p.read_text() for p in metrics} == before
    assert {p: p.stat().st_mtime_ns for p in evals} == evals


def test_evaluate_cli_writes_eval_json(pipeline_dir):
    run = pipeline_dir / "runs" / "bce_leadsI_seed0"
    result = _run("experiments.evaluate", f"--workdir={run}", "--split=test", "--bootstrap_resamples=50")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "macro-AUC" in result.stdout
    # orbax's notices about read-only managers (every evaluation uses them) are silenced at their source.
    assert "read only" not in result.stderr and "read_only" not in result.stderr, result.stderr[-2000:]
    out = json.loads((run / "eval_test.json").read_text())
    lo, hi = out["macro_auc_ci"]
    assert lo <= out["macro_auc"] <= hi
    assert set(out["per_class_auc"]) == {"CD", "HYP", "MI", "NORM", "STTC"}
    assert out["excluded_classes"] == [c for c, v in out["per_class_auc"].items() if v is None]
    scores = evaluate.load_scores(run, "test")
    assert scores["scores"].shape == (12, 5) and np.isfinite(scores["scores"]).all()


def test_evaluate_cli_names_missing_run(tmp_path):
    result = _run("experiments.evaluate", f"--workdir={tmp_path / 'nope'}")
    assert result.returncode == 1
    assert f"{tmp_path / 'nope' / 'run_info.json'} not found: is {tmp_path / 'nope'} a training run folder?" in result.stderr


def test_half_finished_pipeline_resumes(ptbxl_sample_shards, tmp_path, monkeypatch):
    """A pipeline that died in the MVKT stage continues there; earlier runs are not retrained."""
    kwargs = dict(
        workdir=tmp_path,
        data_dir=str(ptbxl_sample_shards),
        leads="I",
        epochs=1,
        arch=TEST_ARCH,
        width_mult=0.25,
        seeds=[0],
        batch_size=0,
        methods=["bce", "mvkt_in_batch"],
        n_resamples=50,
        progress=False,
    )
    real_train_run = study.train_run

    def dies_at_mvkt(run, study_dir, **kw):
        if run.config.method == "mvkt":
            raise KeyboardInterrupt("simulated crash")
        return real_train_run(run, study_dir, **kw)

    monkeypatch.setattr(study, "train_run", dies_at_mvkt)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(**kwargs)
    finished = {p: p.read_text() for p in tmp_path.glob("runs/*/metrics.jsonl")}
    assert len(finished) == 2 and not (tmp_path / "report.md").exists()

    monkeypatch.setattr(study, "train_run", real_train_run)
    report = pipeline.run_pipeline(**kwargs)
    assert report.exists()
    assert {p: p.read_text() for p in finished} == finished
    assert (tmp_path / "runs" / "mvkt_in_batch_leadsI_seed0" / "eval_test.json").exists()


def test_shared_teacher_pairs_with_every_baseline_seed(pipeline_dir):
    """Ablations may reuse one teacher for all seeds: it is paired with each baseline seed."""
    runs = pipeline_dir / "runs"
    bce = [runs / "bce_leadsI_seed0"] * 2
    rows = study.comparison_rows(
        {"teacher": [runs / "teacher_seed0"], "bce": bce}, baseline="bce", n_resamples=50
    )
    teacher = rows[0]
    single = evaluate.compare_runs(bce[:1], [runs / "teacher_seed0"], n_resamples=50)
    assert teacher["num_seeds"] == 1
    assert teacher["vs_baseline"]["difference"] == pytest.approx(single["difference"])


def test_gap_share_is_not_given_when_the_teacher_is_not_significantly_better():
    """A share of a gap the teacher does not significantly have is noise (-470% was printed)."""
    def row(method, auc, ci=None):
        r = {"method": method, "macro_auc": auc, "ci": [auc - 0.02, auc + 0.02], "per_seed": [auc], "num_seeds": 1}
        if ci is not None:
            r["vs_baseline"] = {"difference": auc - 0.84, "ci": ci, "p_value": 0.3}
        return r

    teacher = row("teacher", 0.842, ci=[-0.01, +0.015])
    rows = [teacher, row("bce", 0.84), row("mvkt", 0.85, ci=[-0.005, 0.025])]
    table = study.comparison_table(rows, baseline="bce", teacher=teacher)
    assert "n/a (teacher not significantly better)" in table and "%" not in table.split("mvkt")[1]
    teacher = row("teacher", 0.88, ci=[0.01, 0.07])
    table = study.comparison_table([teacher, rows[1], rows[2]], baseline="bce", teacher=teacher)
    assert "| 25% |" in table
