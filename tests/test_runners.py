"""Experiment runners on the embedded real PTB-XL sample: hyper-parameter sweep declarations,
config-hash run folders, print/local/collect modes of the sweep launcher, and the lead sweep.

Compiles are kept few: the lead sweep's teacher and lead-I students have the configuration
of the pipeline tests' runs (epochs 1, width 0.25, batch 32, default eval batch and K), and the
sweep runs that of the lead sweep's MVKT lead-I student (only seeds differ), so their XLA
programs come from the persistent compilation cache.
"""

import json
import math
import os
import pathlib
import shlex
import subprocess
import sys

import ml_collections
import pytest

from experiments import hyper
from experiments import lead_sweep
from experiments import sweep
from mvkt import run_dir

from helpers import TEST_ARCH

REPO = pathlib.Path(__file__).resolve().parents[1]
SWEEP_MVKT = "experiments/configs/sweep_mvkt.py"
RESAMPLES = 50
# Shared by the lead sweep and the sweep runs below (same programs, compiled once).
TINY = {"student.arch": TEST_ARCH, "teacher.arch": TEST_ARCH, "student.width_mult": 0.25, "teacher.width_mult": 0.25,
        "train.batch_size": 32, "train.epochs": 1, "eval.bootstrap_resamples": RESAMPLES}


# ----------------------------------------------------------------------------- hyper


def test_sweep_product_zip_fixed_give_the_right_override_dicts():
    alphas = hyper.sweep("config.alpha", [0.5, 1.0])
    assert alphas == [{"config.alpha": 0.5}, {"config.alpha": 1.0}]
    grid = hyper.product([alphas, hyper.sweep("config.beta", [0.4, 0.8, 1.6])])
    assert len(grid) == 6
    assert grid[0] == {"config.alpha": 0.5, "config.beta": 0.4}
    assert grid[-1] == {"config.alpha": 1.0, "config.beta": 1.6}
    assert len({tuple(sorted(g.items())) for g in grid}) == 6
    paired = hyper.zip([hyper.sweep("config.train.learning_rate", [1e-3, 1e-2]),
                        hyper.sweep("config.train.schedule", ["constant", "onecycle"])])
    assert paired == [{"config.train.learning_rate": 1e-3, "config.train.schedule": "constant"},
                      {"config.train.learning_rate": 1e-2, "config.train.schedule": "onecycle"}]
    with_fixed = hyper.product([hyper.fixed("config.method", "mvkt"), alphas])
    assert with_fixed == [{"config.method": "mvkt", "config.alpha": 0.5},
                          {"config.method": "mvkt", "config.alpha": 1.0}]
    assert hyper.product([]) == [{}]
    with pytest.raises(ValueError, match="equal length"):
        hyper.zip([alphas, hyper.sweep("config.beta", [1.0])])
    with pytest.raises(ValueError, match="set by two"):
        hyper.product([alphas, hyper.fixed("config.alpha", 2.0)])
    with pytest.raises(ValueError, match="starting with 'config.'"):
        hyper.sweep("alpha", [1.0])
    with pytest.raises(ValueError, match="no values"):
        hyper.sweep("config.alpha", [])


def test_overrides_are_typed_and_unknown_fields_are_errors():
    base = ml_collections.ConfigDict({"alpha": 1.0, "clt": {"num_negatives": 1024}, "data": {"dir": ""}})
    config = hyper.apply_overrides(base, {"config.alpha": 2, "clt.num_negatives": 16})
    assert config.alpha == 2.0 and isinstance(config.alpha, float) and config.clt.num_negatives == 16
    assert base.alpha == 1.0   # a copy
    with pytest.raises(ValueError, match="unknown config field 'config.alfa'"):
        hyper.apply_overrides(base, {"config.alfa": 1.0})
    with pytest.raises(ValueError, match="no group 'clt.x'"):
        hyper.apply_overrides(base, {"clt.x.y": 1})
    with pytest.raises(ValueError, match="num_negatives"):
        hyper.apply_overrides(base, {"clt.num_negatives": 0.5})
    assert hyper.parse_override(base, "clt.num_negatives=256") == ("clt.num_negatives", 256)
    assert hyper.parse_override(base, "config.alpha=1e-1") == ("alpha", 0.1)
    with pytest.raises(ValueError, match="needs a int"):
        hyper.parse_override(base, "clt.num_negatives=many")
    with pytest.raises(ValueError, match="field=value"):
        hyper.parse_override(base, "alpha")


def test_every_named_sweep_of_sweep_mvkt_expands():
    expected = {"alpha_beta": 9, "alpha": 5, "beta": 5, "temperature": 9, "negatives": 4, "lr": 8, "seeds": 3}
    varied = {"alpha_beta": {"alpha", "beta"}, "alpha": {"alpha"}, "beta": {"beta"},
              "temperature": {"mkd_temperature", "clt.temperature"},
              "negatives": {"clt.variant", "clt.num_negatives"}, "lr": {"method", "train.learning_rate"},
              "seeds": {"seed"}}
    for name, count in expected.items():
        runs = sweep.expand(f"{SWEEP_MVKT}:{name}", overrides={"data.dir": "/data"})
        assert len(runs) == count, name
        assert len({r.config_hash for r in runs}) == count
        keys = {hyper.field_path(k) for r in runs for k in r.overrides}
        assert keys == varied[name], name
        assert all(r.config.data.dir == "/data" and r.config.student.leads == "I" for r in runs)
    assert len(sweep.expand(SWEEP_MVKT)) == 9   # alpha_beta is the default
    with pytest.raises(ValueError, match="unknown sweep 'nope'"):
        sweep.expand(f"{SWEEP_MVKT}:nope")


def test_run_folders_are_keyed_by_the_full_config_hash():
    spec = f"{SWEEP_MVKT}:alpha"
    first = sweep.expand(spec, overrides={"data.dir": "/data", "train.epochs": 3})
    again = sweep.expand(spec, overrides={"config.train.epochs": 3, "data.dir": "/data"})
    assert [r.config_hash for r in first] == [r.config_hash for r in again]
    assert all(r.config_hash == run_dir.config_hash(r.config) for r in first)
    assert first[0].workdir(pathlib.Path("/s")) == pathlib.Path("/s/runs") / first[0].config_hash
    changed = sweep.expand(spec, overrides={"data.dir": "/data", "train.epochs": 4})
    assert not {r.config_hash for r in first} & {r.config_hash for r in changed}
    # a relative path means the same folder from anywhere: it is made absolute before hashing
    relative = sweep.expand(spec, overrides={"data.dir": "data", "train.epochs": 3})
    assert relative[0].config.data.dir == str(pathlib.Path("data").absolute())
    with pytest.raises(ValueError, match="--config.alpha is swept"):
        sweep.expand(spec, overrides={"alpha": 2.0})
    with pytest.raises(ValueError, match="unknown config field"):
        sweep.expand(spec, overrides={"train.epoch": 3})


def test_lead_sets_from_flags():
    assert lead_sweep.lead_sets("all12") == ["I", "II", "III", "aVR", "aVL", "aVF",
                                             "V1", "V2", "V3", "V4", "V5", "V6"]
    assert lead_sweep.lead_sets("I; II;I,II;I,II,V2; ;I") == ["I", "II", "I,II", "I,II,V2"]
    assert lead_sweep.lead_sets("II,I") == ["II,I"]
    with pytest.raises(ValueError, match="unknown lead"):
        lead_sweep.lead_sets("I;V7")
    with pytest.raises(ValueError, match="no lead sets"):
        lead_sweep.lead_sets(" ; ")


# ----------------------------------------------------------------------------- lead sweep


def _lead_sweep_args(shards):
    overrides = {k: v for k, v in TINY.items()
                 if k not in ("student.arch", "teacher.arch", "student.width_mult", "teacher.width_mult",
                              "train.batch_size", "train.epochs")}
    return dict(data_dir=shards, seeds=[0], epochs=1, arch=TEST_ARCH, width_mult=0.25, batch_size=32,
                n_resamples=RESAMPLES, overrides=overrides, progress=False)


@pytest.fixture(scope="module")
def lead_sweep_dir(ptbxl_sample_shards, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lead_sweep")
    report = lead_sweep.run_lead_sweep(workdir=workdir, lead_sets=["I", "II"], **_lead_sweep_args(ptbxl_sample_shards))
    assert report == workdir / "lead_sweep.md"
    return workdir


def _metrics_files(directory):
    return {p: (p.stat().st_mtime_ns, p.read_text()) for p in sorted(directory.glob("runs/*/metrics.jsonl"))}


def test_lead_sweep_writes_table_json_and_plot(lead_sweep_dir, ptbxl_sample_shards):
    text = (lead_sweep_dir / "lead_sweep.md").read_text()
    rows = [l for l in text.splitlines() if l.startswith("| I ") or l.startswith("| II ")]
    assert len(rows) == 2 + 2 * 2   # result table + runs table (bce, mvkt per lead)
    assert "gain MVKT - BCE [paired 95% CI]" in text and "12-lead teacher: test macro-AUC" in text
    result = json.loads((lead_sweep_dir / "lead_sweep.json").read_text())
    assert [r["leads"] for r in result["rows"]] == ["I", "II"]
    for r in result["rows"]:
        numbers = [r["bce"]["macro_auc"], *r["bce"]["ci"], r["method"]["macro_auc"], *r["method"]["ci"],
                   r["gain"]["difference"], *r["gain"]["ci"], r["gain"]["p_value"]]
        assert all(math.isfinite(x) for x in numbers), r
        assert 0.0 <= r["bce"]["macro_auc"] <= 1.0 and 0.0 <= r["gain"]["p_value"] <= 1.0
        assert r["gain"]["n_resamples"] == RESAMPLES
        assert abs(r["gain"]["difference"] - (r["method"]["macro_auc"] - r["bce"]["macro_auc"])) < 1e-9
    assert math.isfinite(result["teacher"]["macro_auc"])
    png = lead_sweep_dir / "plots" / "lead_sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = sorted(p.name for p in (lead_sweep_dir / "runs").iterdir())
    # Named like every study's runs (study.train_group): one teacher shared by the lead sets.
    assert runs == ["bce_leadsII_seed0", "bce_leadsI_seed0", "mvkt_leadsII_seed0", "mvkt_leadsI_seed0",
                    "teacher_seed0"]
    for name in runs:
        assert (lead_sweep_dir / "runs" / name / "eval_test.json").exists()
    student = run_dir.load_config(next((lead_sweep_dir / "runs").glob("mvkt_*leadsII_*")))
    assert (student.method, student.student.leads, student.eval.bootstrap_resamples) == ("mvkt", "II", RESAMPLES)
    assert list(student.teacher.runs) == [str(lead_sweep_dir / "runs" / runs[-1])]


def test_lead_sweep_rerun_trains_nothing_and_reuses_teachers(lead_sweep_dir, ptbxl_sample_shards,
                                                             tmp_path):
    before = _metrics_files(lead_sweep_dir)
    common = dict(lead_sets=["I"], **_lead_sweep_args(ptbxl_sample_shards))
    lead_sweep.run_lead_sweep(workdir=lead_sweep_dir, **common)
    assert _metrics_files(lead_sweep_dir) == before
    teacher = str(lead_sweep_dir / "runs" / "teacher_seed{seed}*")
    with pytest.raises(FileNotFoundError, match="matches 0 folders"):
        lead_sweep.run_lead_sweep(workdir=tmp_path, teacher_dir=teacher.replace("seed{seed}", "seed{seed}x"),
                                  **common)
    # Reusing the teacher trained here gives the students the same teacher.runs, hence the
    # same configs: nothing to train.
    report = lead_sweep.run_lead_sweep(workdir=lead_sweep_dir, teacher_dir=teacher, **common)
    assert _metrics_files(lead_sweep_dir) == before
    assert "`runs/teacher_seed0`" in report.read_text()
    # A changed setting in the same study folder is refused, not silently resumed.
    with pytest.raises(ValueError, match="train.learning_rate"):
        lead_sweep.run_lead_sweep(workdir=lead_sweep_dir, **{
            **common, "overrides": {**common["overrides"], "train.learning_rate": 0.5}})


# ----------------------------------------------------------------------------- sweep launcher


SEED_SWEEP = '''
from experiments.configs import student


def get_config(arg=None):
    return student.get_config()


def get_hyper(hyper):
    return hyper.sweep("config.seed", [0, 1])
'''


def test_print_mode_command_runs_then_local_sweep_and_rerun_train_nothing(
        lead_sweep_dir, ptbxl_sample_shards, tmp_path):
    spec_file = tmp_path / "sweep_seeds.py"
    spec_file.write_text(SEED_SWEEP)
    teacher = lead_sweep_dir / "runs" / "teacher_seed0"
    overrides = {"data.dir": str(ptbxl_sample_shards), "teacher.runs": (str(teacher),), **TINY}
    sweep_dir = tmp_path / "sweep"

    printed = sweep.run_sweep(config_spec=str(spec_file), workdir=sweep_dir, overrides=overrides,
                              mode="print")
    commands = printed["commands"]
    assert len(commands) == 2 and printed["table"] is None
    runs = printed["runs"]
    for command, run in zip(commands, runs):
        args = shlex.split(command)
        assert args[:3] == ["python", "-m", "experiments.train"]
        assert f"--workdir={sweep_dir / 'runs' / run.config_hash}" in args
        assert f"--config.seed={run.config.seed}" in args and "--config.student.width_mult=0.25" in args
        overrides_file = json.loads((sweep_dir / "runs" / run.config_hash / "overrides.json").read_text())
        assert overrides_file["overrides"] == {"config.seed": run.config.seed}
    # The printed command trains exactly the config the launcher hashed, into its folder.
    args = shlex.split(commands[0])
    result = subprocess.run([sys.executable, *args[1:]], cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr[-3000:]
    first = sweep_dir / "runs" / runs[0].config_hash
    assert json.loads((first / "run_info.json").read_text())["config_hash"] == runs[0].config_hash
    assert run_dir.is_finished(first)

    collected = sweep.run_sweep(config_spec=str(spec_file), workdir=sweep_dir, overrides=overrides,
                                collect_only=True)
    table = json.loads((sweep_dir / "sweep.json").read_text())["rows"]
    assert [r["status"] for r in table] == ["finished", "not started"]
    assert "test_macro_auc" not in table[0]   # collect evaluates nothing
    assert collected["table"].exists()

    first_metrics = _metrics_files(sweep_dir)
    local = sweep.run_sweep(config_spec=str(spec_file), workdir=sweep_dir, overrides=overrides,
                            mode="local", progress=False, log=lambda m: None)
    after = _metrics_files(sweep_dir)
    assert len(after) == 2 and all(after[p] == v for p, v in first_metrics.items())  # run 0 not retrained
    text = local["table"].read_text()
    assert "select settings by the validation column" in text
    body = [l for l in text.splitlines() if l.startswith("| ") and l.split("|")[1].strip().isdigit()]
    assert len(body) == 2 and all("finished" in l for l in body)
    table = json.loads((sweep_dir / "sweep.json").read_text())["rows"]
    vals = [r["val_macro_auc"] for r in table]
    assert vals == sorted(vals, reverse=True) and all(0.0 <= v <= 1.0 for v in vals)
    for r in table:
        assert r["test_n_resamples"] == RESAMPLES and r["test_ci"][0] <= r["test_ci"][1]
        assert math.isfinite(r["test_macro_auc"])

    sweep.run_sweep(config_spec=str(spec_file), workdir=sweep_dir, overrides=overrides,
                    mode="local", progress=False, log=lambda m: None)
    assert _metrics_files(sweep_dir) == after


def test_sweep_cli_print_mode_matches_the_library(lead_sweep_dir, ptbxl_sample_shards, tmp_path):
    data = ptbxl_sample_shards
    teacher = lead_sweep_dir / "runs" / "teacher_seed0"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.sweep", f"--config={SWEEP_MVKT}:negatives",
         f"--workdir={tmp_path / 'sw'}", "--mode=print", f"--config.data.dir={data}",
         f"--config.teacher.runs={teacher}", "--config.train.epochs=2"],
        cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    expected = sweep.expand(f"{SWEEP_MVKT}:negatives",
                            overrides={"data.dir": str(data), "teacher.runs": (str(teacher),), "train.epochs": 2})
    assert [f"--workdir={tmp_path / 'sw' / 'runs' / r.config_hash}" in shlex.split(l)
            for l, r in zip(lines, expected)] == [True] * 4
    assert all(f"--config={REPO / SWEEP_MVKT}:negatives" in shlex.split(l) for l in lines)
    assert "4 runs" in result.stderr
    missing_teacher = sweep.expand(f"{SWEEP_MVKT}:negatives", overrides={"data.dir": str(data)})
    with pytest.raises(ValueError, match="needs a trained teacher"):
        sweep.validate(missing_teacher)
    # Print mode checks before printing: jobs that would all fail are not printed.
    with pytest.raises(FileNotFoundError, match="no shards"):
        sweep.run_sweep(config_spec=f"{SWEEP_MVKT}:negatives", workdir=tmp_path / "sw2", mode="print",
                        overrides={"data.dir": str(tmp_path / "nowhere")})
    assert not (tmp_path / "sw2").exists()


def test_sweep_print_mode_passes_the_multi_host_flags_on(lead_sweep_dir, ptbxl_sample_shards, tmp_path):
    """Printing starts no job; every printed command carries the job's multi-host flags
    (not --process_id, which differs per host)."""
    teacher = lead_sweep_dir / "runs" / "teacher_seed0"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.sweep", f"--config={SWEEP_MVKT}:negatives",
         f"--workdir={tmp_path / 'sw'}", "--mode=print", f"--config.data.dir={ptbxl_sample_shards}",
         f"--config.teacher.runs={teacher}",
         "--distributed", "--coordinator_address=127.0.0.1:1234", "--num_processes=4"],
        cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4
    for line in lines:
        args = shlex.split(line)
        assert args[-3:] == ["--distributed", "--coordinator_address=127.0.0.1:1234", "--num_processes=4"]
        assert not any(a.startswith("--process_id") for a in args)


def _study_flags(out: str) -> dict[str, str]:
    """--flag -> default of the flags defined through experiments.study, from --helpfull output."""
    section = out.split("experiments.study:")[1].split("\n\n")[0]
    names = {}
    for line in section.splitlines():
        if line.startswith("  --"):
            current = line.split(":")[0].strip().lstrip("-").removeprefix("[no]")
            names[current] = ""
        elif "(default:" in line:
            names[current] = line.split("(default:")[1].split(")")[0].strip()
    return names


def test_every_study_runner_has_the_same_study_flags():
    """pipeline, ablation, lead_sweep and crossval share one set of study flags (names and
    defaults); only the study folder, the default lead set(s) and methods differ."""
    runners = ("pipeline", "ablation", "lead_sweep", "crossval")
    procs = {m: subprocess.Popen([sys.executable, "-m", f"experiments.{m}", "--helpfull"], cwd=REPO, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 env=dict(os.environ, PYTHONPATH=str(REPO))) for m in runners}
    try:
        flags_of = {m: _study_flags(p.communicate(timeout=120)[0]) for m, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    names = {m: set(f) for m, f in flags_of.items()}
    assert all(n == names["pipeline"] for n in names.values()), names
    assert {"workdir", "data_dir", "leads", "methods", "seeds", "epochs", "teacher_dir", "override"} <= names["pipeline"]
    own = {"workdir", "leads", "methods"}
    for m, f in flags_of.items():
        assert {k: v for k, v in f.items() if k not in own} == {
            k: v for k, v in flags_of["pipeline"].items() if k not in own}, m
    assert flags_of["ablation"]["seeds"] == "'0'" and flags_of["lead_sweep"]["leads"] == "'all12'"


def test_two_student_runners_take_bce_and_exactly_one_method():
    from experiments import study

    assert study.compared_method(["bce", "mvkt_in_batch"], runner="pipeline") == "mvkt_in_batch"
    with pytest.raises(ValueError, match="compares bce with one method.*ablation for several"):
        study.compared_method(["bce", "kd", "mkd"], runner="pipeline")
    with pytest.raises(ValueError, match="compares bce with one method"):
        study.compared_method(["bce", "bce"], runner="lead sweep")
    assert study.teacher_gap_share(difference=0.01, gap=0.04, teacher_ci=[0.01, 0.07]) == 0.25
    assert study.teacher_gap_share(difference=0.01, gap=0.002, teacher_ci=[-0.01, 0.015]) is None
    assert study.format_gap_share(None) == "n/a (teacher not significantly better)"
