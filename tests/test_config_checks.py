"""Hardening, round 2 (issue 24), the config cases: a config that would train nothing, diverge
at once or train on padding is refused before training with one line naming the field; a
rerun with the same train.stop_at_step does nothing; a non-integer PTB-XL fold is a named
rejection; flat, all-zero and partly missing records are rejected; a bad command line (an override naming no field, a config file that does not
compile, an unknown sweep name) ends with one line; a missing or damaged teacher folder is
named as such; predict and export refuse an unfinished run unless allowed, and mark it."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from data_prep import ptbxl
from experiments.configs import student as student_config
from experiments.configs import teacher as teacher_config
from helpers import tiny
from mvkt import run_dir, train
from test_data_prep import copy_ptbxl, read_rejected

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("field,value,message", [
    ("train.epochs", 0, r"config.train.epochs=0: must be an integer >= 1"),
    ("train.learning_rate", -0.01, r"config.train.learning_rate=-0.01: must be a number > 0"),
    ("train.batch_size", 0, r"config.train.batch_size=0: must be an integer >= 1"),
    ("data.crop_seconds", 20.0, r"config.data.crop_seconds=20: longer than every training record \(10 s at most\)"),
])
def test_a_config_that_cannot_train_is_refused_before_training(ptbxl_sample_shards, tmp_path, field, value, message):
    config = tiny(teacher_config.get_config(), ptbxl_sample_shards, **{field: value})
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_rerun_with_the_same_stop_does_nothing_and_one_without_it_continues(ptbxl_sample_shards, tmp_path):
    stopped = tiny(teacher_config.get_config(), ptbxl_sample_shards, **{"train.stop_at_step": 2})
    train.train_and_evaluate(stopped, tmp_path, progress=False)
    again = train.train_and_evaluate(stopped, tmp_path, progress=False)
    assert again["stopped_at_step"] == 2 and again["step"] == 2 and not again["finished"]
    assert run_dir.checkpoint_steps(tmp_path) == [2]
    finished = train.train_and_evaluate(tiny(teacher_config.get_config(), ptbxl_sample_shards), tmp_path,
                                        progress=False)
    assert finished["finished"] and finished["step"] == 4


def test_a_non_integer_ptbxl_fold_is_a_named_rejection(tmp_path):
    src = copy_ptbxl(tmp_path / "src")
    db = pd.read_csv(src / "ptbxl_database.csv")
    db["strat_fold"] = db["strat_fold"].astype(str)
    db.loc[db.ecg_id == 1, "strat_fold"] = "x"
    db.to_csv(src / "ptbxl_database.csv", index=False)
    manifest = ptbxl.main(["ptbxl", f"--src={src}", f"--out={tmp_path / 'o'}", "--max_rejected_fraction=0.2"])
    assert manifest["rejected"]["counted"] >= 1
    assert "strat_fold 'x' in ptbxl_database.csv is not an integer" in read_rejected(tmp_path / "o" / "rejected.csv")["1"]


SYNTAX_ERROR_CONFIG = "import ml_collections\n\ndef get_config(arg=None)\n    return ml_collections.ConfigDict()\n"


@pytest.mark.parametrize("command,line", [
    (["experiments.train", "--config=experiments/configs/teacher.py", "--workdir={tmp}/run", "--config.train.epoch=5"],
     "error: --config.train.epoch: the config has no field 'epoch'; did you mean 'epochs'?"),
    (["experiments.train", "--config=experiments/configs/teacher.py", "--workdir={tmp}/run", "--config.trian.epochs=5"],
     "error: --config.trian.epochs: the config has no field 'trian'; did you mean 'train'?"),
    (["experiments.train", "--config={tmp}/broken.py", "--workdir={tmp}/run"],
     "error: {tmp}/broken.py, line 3: SyntaxError: expected ':'"),
    (["experiments.sweep", "--config=experiments/configs/sweep_mvkt.py:nope", "--mode=print"],
     "error: flag --config=experiments/configs/sweep_mvkt.py:nope: experiments/configs/sweep_mvkt.py, line 53: "
     "ValueError: unknown sweep 'nope' in sweep_mvkt.py; choose one of alpha_beta, alpha, beta, temperature, "
     "negatives, lr, seeds"),
    (["experiments.sweep", "--config=experiments/configs/sweep_mvkt.py:alpha_beta", "--workdir={tmp}/sw",
      "--mode=print"],
     "error: run {{'config.alpha': 0.5, 'config.beta': 0.4}}: no shards at config.data.dir=''; pass "
     "--config.data.dir=SHARDS"),
])
def test_a_bad_command_line_ends_with_one_line(tmp_path, command, line):
    """A typo in a config override, a config file that does not compile and an unknown sweep
    name end before anything starts: exit 1 and one line (ml_collections' traceback before)."""
    (tmp_path / "broken.py").write_text(SYNTAX_ERROR_CONFIG)
    args = [a.format(tmp=tmp_path) for a in command]
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [line.format(tmp=tmp_path)], result.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_a_missing_or_damaged_teacher_folder_is_named(ptbxl_sample_shards, tiny_teacher, tmp_path):
    """Not 'teacher ... stopped at step 0/None: finish it', which sent users to rerun a
    training that did not exist."""
    def student(teacher):
        return tiny(student_config.get_config(), ptbxl_sample_shards, method="kd", **{"teacher.runs": (str(teacher),)})

    with pytest.raises(FileNotFoundError, match=rf"^teacher {tmp_path / 'nowhere'}: no such folder"):
        train.train_and_evaluate(student(tmp_path / "nowhere"), tmp_path / "s1", progress=False)
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_teacher, damaged)
    (damaged / "config.json").write_text('{"seed": 0, "trai')
    with pytest.raises(ValueError, match=rf"^{damaged / 'config.json'}: damaged config \("):
        train.train_and_evaluate(student(damaged), tmp_path / "s2", progress=False)
    (damaged / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"^{damaged / 'config.json'} not found"):
        train.train_and_evaluate(student(damaged), tmp_path / "s3", progress=False)


def _entry_point(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=300)


def test_predict_and_export_refuse_an_unfinished_run_unless_allowed_and_mark_it(ptbxl_sample_shards, tmp_path):
    """A run stopped at step 2 of 4 gave predictions and an ONNX model without a word."""
    from mvkt import export, run_dir

    run = tmp_path / "stopped"
    train.train_and_evaluate(tiny(student_config.get_config(), ptbxl_sample_shards, method="bce",
                                  **{"train.stop_at_step": 2}), run, progress=False)
    record = str(REPO / "data_prep" / "samples" / "ptbxl" / "records100" / "00000" / "00001_lr")
    refusal = f"error: {run} is an unfinished run (2 of 4 steps trained): finish its training (rerun its command) " \
              "or pass --allow_unfinished to use it anyway"
    for command in (["experiments.predict", f"--workdir={run}", record],
                    ["experiments.export", f"--workdir={run}", f"--out={tmp_path / 'net.onnx'}"]):
        result = _entry_point(*command)
        assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == refusal, result.stderr[-2000:]
    assert not (tmp_path / "net.onnx").exists()
    allowed = _entry_point("experiments.predict", f"--workdir={run}", "--allow_unfinished",
                           f"--out={tmp_path / 'p.json'}", record)
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert "used anyway (--allow_unfinished)" in allowed.stderr
    out = json.loads((tmp_path / "p.json").read_text())
    assert (out["run_finished"], out["trained_steps"], out["total_steps"]) == (False, 2, 4)
    metadata = export.exported_net(run, which="latest").metadata
    assert json.loads(metadata["training"]) == run_dir.training_status(run) == {
        "run_finished": False, "trained_steps": 2, "total_steps": 4}


def _rewrite_samples(record: pathlib.Path, change) -> None:
    """Rewrites a WFDB record's digital samples through ``change`` with a valid header checksum."""
    import wfdb

    r = wfdb.rdrecord(str(record), physical=False)
    wfdb.wrsamp(record.name, fs=r.fs, units=r.units, sig_name=r.sig_name, d_signal=change(r.d_signal.copy()),
                fmt=r.fmt, adc_gain=r.adc_gain, baseline=r.baseline, write_dir=str(record.parent))


def test_flat_and_all_zero_records_and_missing_samples_anywhere_are_rejected(tmp_path):
    """An all-zero and an all-flat PTB-XL record (valid checksums) were prepared and trained on."""
    src = copy_ptbxl(tmp_path / "src")
    records = src / "records100" / "00000"

    def some_missing(d):
        d[100:200, 3] = -32768  # WFDB's invalid sample: NaN in 100 samples of one lead
        return d

    _rewrite_samples(records / "00001_lr", some_missing)
    _rewrite_samples(records / "00002_lr", np.zeros_like)
    _rewrite_samples(records / "00003_lr", lambda d: np.repeat(d[:1], len(d), axis=0))
    ptbxl.main(["ptbxl", f"--src={src}", f"--out={tmp_path / 'o'}", "--max_rejected_fraction=0.2"])
    rejected = read_rejected(tmp_path / "o" / "rejected.csv")
    assert "missing samples (NaN, digital -32768) in lead AVR" in rejected["1"]
    assert rejected["2"] == "2: flat on all 12 leads (all samples are 0)"
    assert rejected["3"] == "3: flat on all 12 leads (every lead's peak-to-peak range is below 0.01 mV)"
    assert len(rejected) == 3  # the real records are not flat


def test_data_prep_on_a_full_or_read_only_disk_ends_with_one_line(tmp_path, monkeypatch, capsys):
    """--out on a full disk (ENOSPC in a worker's _load_chunk) and on a read-only filesystem
    (the work folder's mkdir) printed tracebacks."""
    import errno as errno_lib
    import resource

    def small_files():  # as a full disk: writes past 64 KiB fail (EFBIG; Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    out = tmp_path / "full"
    result = subprocess.run([sys.executable, "-m", "data_prep.ptbxl", f"--src={REPO / 'data_prep/samples/ptbxl'}",
                             f"--out={out}"], cwd=REPO, env=dict(env, PYTHONPATH=str(REPO)), capture_output=True,
                            text=True, timeout=300, preexec_fn=small_files)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"data_prep.ptbxl: error: {out}: cannot write the shards: file too large; free space or choose another "
        "--out (nothing was written to it)")
    assert not out.exists() and not list(tmp_path.glob(".full*"))

    real_mkdir = pathlib.Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.name.startswith(".shards.tmp-"):
            raise OSError(errno_lib.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    with pytest.raises(SystemExit) as exit_info:
        ptbxl.main(["ptbxl", f"--src={REPO / 'data_prep/samples/ptbxl'}", f"--out={tmp_path / 'shards'}"])
    assert exit_info.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"data_prep.ptbxl: error: {tmp_path / 'shards'}: cannot write the shards: read-only "
                           f"file system ({tmp_path / '.shards.tmp-'}"), line


def test_a_stray_signal_file_in_a_cinc_folder_does_not_count_as_a_rejected_record(samples_dir, tmp_path):
    """junk.mat without a header counted as a rejected record: one stray file blocked the
    11-record CinC sample under the default 5% limit."""
    from data_prep import cinc

    src = tmp_path / "src"
    shutil.copytree(samples_dir / "cinc", src)
    (src / "junk.mat").write_bytes(b"not a record")
    manifest = cinc.prepare(src, tmp_path / "o")  # the default --max_rejected_fraction
    assert manifest["rejected"]["counted"] == 0 and manifest["rejected"]["not_counted"] == 1
    assert read_rejected(tmp_path / "o" / "rejected.csv")["junk"] == (
        f"junk: {src / 'junk.mat'} has no header junk.hea beside it (not a record; listed, not counted)")


def test_shard_verification_finds_a_few_non_finite_samples_anywhere(ptbxl_sample_shards, tmp_path):
    """NaN in 100 samples of one training record, in shards whose manifest hashes match
    (written by other code than data_prep): training went on with finite losses because
    its random crops missed them. Verification scans every sample."""
    from mvkt import data as data_lib

    shards = tmp_path / "shards"
    shutil.copytree(ptbxl_sample_shards, shards)
    signals = np.load(shards / "train_signals.npy")
    signals[5, 100:200, 3] = np.nan
    np.save(shards / "train_signals.npy", signals)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["files"]["train_signals.npy"] = data_lib._sha256(shards / "train_signals.npy")
    (shards / "manifest.json").write_text(json.dumps(manifest))
    record = np.load(shards / "train_record_ids.npy")[5]
    with pytest.raises(data_lib.ShardError, match=rf"train_signals.npy: NaN/inf samples in record {record}\b"):
        data_lib.verify_shards(shards, cache_dir=tmp_path / "cache")


# The study runners adopt experiments.study's flags one way (pipeline, ablation and lead_sweep
# in their __main__, crossval in its define_flags): one of each, and train.
RUNNER_FLAGS = {
    "experiments.pipeline": ["--workdir", "--seeds", "--methods", "--override"],
    "experiments.crossval": ["--workdir", "--rounds", "--split", "--seeds", "--methods"],
    "experiments.train": ["--config", "--workdir", "--config_help"],
}


def test_every_runner_lists_its_flags_in_help_and_train_lists_the_config_fields():
    """--help, not only --helpfull: the study runners' shared flags are defined in
    experiments.study, which absl does not count as the program's own unless adopted."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = {m: subprocess.Popen([sys.executable, "-m", m, "--help"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for m in RUNNER_FLAGS}
    fields = subprocess.run([sys.executable, "-m", "experiments.train", "--config=experiments/configs/student.py",
                             "--config_help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    for module, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        listed = {line.split(":")[0].strip().replace("--[no]", "--") for line in out.splitlines()
                  if line.startswith("  --")}
        assert set(RUNNER_FLAGS[module]) <= listed, (module, sorted(listed))
    assert fields.returncode == 0, fields.stderr[-2000:]
    lines = {line.split()[0]: line for line in fields.stdout.splitlines()[2:] if line.strip()}
    assert "'mvkt'" in lines["method"] and "bce | kd | mkd | clt | mvkt" in lines["method"]
    assert "weight of the CLT term" in lines["beta"] and len(lines) > 60
