"""A trained lead-I student used outside its shards: predictions on raw real records,
ONNX / int8 / StableHLO export, external validation on the CPSC sample.

Tolerances: predictions equal the evaluation's scores within 1e-5 (the same reader,
standardisation and windows; only the batch composition differs); float32 ONNX and
StableHLO equal the jitted JAX forward within 1e-4 in probability; int8 (static QDQ,
calibrated on the 67 training windows of a 2-epoch toy model) within 0.25 in
probability and 0.05 on average: int8's effect on a properly trained student's AUC is
measured in benchmarks/export.py, not here.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import onnxruntime as ort
import pytest

from data_prep import cpsc2018
from data_prep.records import read_any
from data_prep.wfdb_io import RecordError as ReadError
from experiments.configs import student as student_config
from helpers import tiny
from mvkt import evaluate, export, inference, quality, run_dir, train
from mvkt import models as models_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data_prep" / "samples"
MAPS = REPO / "data_prep" / "mappings"
TIMEOUT_S = 300


def cli(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def student(ptbxl_sample_shards, tmp_path_factory):
    """A BCE lead-I student on its own copy of the sample shards, evaluated on val and test."""
    root = tmp_path_factory.mktemp("deploy")
    shards = root / "shards"
    shutil.copytree(ptbxl_sample_shards, shards)
    config = tiny(student_config.get_config(), shards, method="bce")
    workdir = root / "S"
    train.train_and_evaluate(config, workdir, progress=False)
    for split in ("val", "test"):
        evaluate.evaluate_run(workdir, split=split, n_resamples=20)
    return workdir, shards


def _record_path(ecg_id: int) -> str:
    return str(SAMPLES / "ptbxl" / "records100" / "00000" / f"{ecg_id:05d}_lr")


def test_the_run_folder_carries_its_preprocessing_and_provenance(student):
    workdir, shards = student
    info = run_dir.load_info(workdir)
    manifest = json.loads((shards / "manifest.json").read_text())
    assert info["preprocessing"]["standardization"] == manifest["preprocessing"]["standardization"]
    assert info["preprocessing"]["sampling_rate"] == 100 and info["preprocessing"]["band_pass"] is None
    assert info["inference"] == {"window": 250, "stride": 125, "aggregate": "max"}
    assert set(info["provenance"]["packages"]) >= {"jax", "flax", "orbax-checkpoint"}
    assert info["provenance"]["devices"] and info["provenance"]["command"]
    thresholds = json.loads((workdir / "thresholds.json").read_text())
    assert list(thresholds["per_class"]) == info["label_names"]


def test_predict_cli_equals_the_evaluation_score_without_the_shards(student, tmp_path):
    workdir, shards = student
    scores = dict(np.load(workdir / "scores_test.npz"))
    ids = [str(r) for r in scores["record_ids"]]
    away = shards.with_name("shards_moved_away")
    shards.rename(away)
    try:
        out = tmp_path / "p.json"
        result = cli("experiments.predict", f"--workdir={workdir}", _record_path(int(ids[0])),
                     _record_path(int(ids[1])), f"--out={out}")
    finally:
        away.rename(shards)
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = json.loads(out.read_text())["records"]
    for k in (0, 1):
        probs = [predicted[k]["probabilities"][name] for name in scores["label_names"]]
        np.testing.assert_allclose(probs, scores["scores"][k], atol=1e-5)
    assert "probability" in result.stdout and "on the validation split" in result.stdout
    # A flat trace (contact loss) is reported unusable and not classified; the record beside it is.
    flat = tmp_path / "flat.csv"
    np.savetxt(flat, np.zeros(1000), delimiter=",")
    csv_out = tmp_path / "p.csv"
    result = cli("experiments.predict", f"--workdir={workdir}", _record_path(int(ids[0])), str(flat), "--fs=100",
                 "--lead=I", f"--out={csv_out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{flat}  (100 Hz, 10.0 s)\n  unusable: decision withheld" in result.stdout
    rows = csv_out.read_text().splitlines()
    assert rows[0] == "record,status,class,probability,threshold,decision,quality_failures"
    assert [r.split(",")[1] for r in rows[1:]] == ["classified"] * 5 + ["unusable"] * 5
    assert all(r.split(",")[3] == "" and "flat_fraction" in r for r in rows[6:])


def test_the_python_call_and_a_single_lead_trace(student, tmp_path):
    workdir, _ = student
    signal, fs, leads = read_any(_record_path(9))
    probs = inference.predict(workdir, signal, fs=fs, leads=leads)
    trace = tmp_path / "lead_i.csv"
    np.savetxt(trace, signal[:, 0], delimiter=",")  # what a single-lead wearable writes
    single, rate, names = read_any(trace, fs=100, leads=["I"])
    from_trace = inference.predict(workdir, single, fs=rate, leads=names)
    np.testing.assert_allclose(list(from_trace.values()), list(probs.values()), atol=1e-5)
    # The same trace at 500 Hz: resampled to the run's 100 Hz.
    np.save(tmp_path / "lead_i_500.npy", np.repeat(signal[:, :1], 5, axis=0))
    up, rate, names = read_any(tmp_path / "lead_i_500.npy", fs=500, leads=["I"])
    assert rate == 500 and set(inference.predict(workdir, up, fs=rate, leads=names)) == set(probs)


def test_records_that_cannot_be_scored_are_one_line_errors(student, tmp_path):
    workdir, _ = student
    signal, _, _ = read_any(_record_path(9))
    np.save(tmp_path / "lead_ii.npy", signal[:, 1])
    nan = signal[:, 0].copy()
    nan[100] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "short.npy", signal[:200, 0])  # 2 s: shorter than the 2.5 s window
    cases = {
        "lead_ii.npy": (["--fs=100", "--lead=II"], "has leads ['II'], the model needs ['I']"),
        "nan.npy": (["--fs=100", "--lead=I"], "NaN or infinite samples"),
        "short.npy": (["--fs=100", "--lead=I"], "2 s long, shorter than one model window (2.5 s = 250 samples"),
        "lead_ii.npy ": ([], "carries no sampling rate or lead names: give --fs=HZ and --lead=NAME"),
        "missing_record": ([], "no such record"),
    }
    for name, (flags_, message) in cases.items():
        path = str(tmp_path / name.strip())
        result = cli("experiments.predict", f"--workdir={workdir}", path, *flags_)
        assert result.returncode == 1, (name, result.stderr[-2000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and path in errors[0] and message in errors[0], (name, errors)
        assert "Traceback" not in result.stderr
    # A bad record among good ones: the good ones are still scored.
    result = cli("experiments.predict", f"--workdir={workdir}", str(tmp_path / "nan.npy"), _record_path(9))
    assert result.returncode == 1 and _record_path(9) in result.stdout


def test_onnx_export_equals_the_jax_forward_on_real_records_and_int8_is_close(student, tmp_path):
    workdir, _ = student
    out = tmp_path / "m.onnx"
    result = cli("experiments.export", f"--workdir={workdir}", "--format=onnx", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert (inp.name, inp.shape) == ("ecg", ["batch", 250, 1])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["label_names"]) == run_dir.load_info(workdir)["label_names"]
    assert json.loads(meta["quality_gate"])["thresholds"] == quality.DEFAULT_THRESHOLDS.as_dict()
    import onnx

    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops

    windows = export.calibration_windows(workdir, count=48)  # real training windows, raw
    net = export.exported_net(workdir)
    expected = np.asarray(jax.jit(net.fn)(windows))
    for batch in (windows, windows[:1]):  # the batch axis is dynamic
        got = session.run(None, {"ecg": batch})[0]
        assert np.abs(got - expected[: len(batch)]).max() <= 1e-4

    int8 = tmp_path / "m8.onnx"
    result = cli("experiments.export", f"--workdir={workdir}", "--format=onnx", "--quantize=int8", f"--out={int8}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["int8"]["bytes"] < summary["float32"]["bytes"] and "static QDQ" in summary["int8"]["method"]
    report = summary["int8_vs_float32"]  # agreement on this run's validation windows, latency here
    assert report["validation_windows"] > 16 and 0 <= report["mean_probability_difference"] <= report[
        "max_probability_difference"] <= 1
    assert set(report["val_macro_auc"]) == {"float32", "int8"} and set(report["latency_ms_per_record"]) == {
        "float32", "int8"}
    assert ("warning" in report) == (report["latency_ms_per_record"]["int8"] > report["latency_ms_per_record"]["float32"])
    assert "pre-processing before quantization" not in result.stderr
    got = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"]).run(None, {"ecg": windows})[0]
    assert np.abs(got - expected).max() <= 0.25 and np.abs(got - expected).mean() <= 0.05

    hlo = tmp_path / "m.stablehlo"
    assert cli("experiments.export", f"--workdir={workdir}", "--format=stablehlo", f"--out={hlo}").returncode == 0
    restored = jax.export.deserialize(hlo.read_bytes())
    assert np.abs(np.asarray(restored.call(windows[:3])) - expected[:3]).max() <= 1e-4


def test_external_evaluation_on_the_cpsc_sample_keeps_the_in_domain_files(student, tmp_path):
    workdir, _ = student
    cpsc = tmp_path / "cpsc"
    cpsc2018.prepare(SAMPLES / "cpsc2018", cpsc)
    before = {name: (workdir / name).read_bytes() for name in ("eval_test.json", "scores_test.npz",
                                                              "scores_val.npz", "thresholds.json")}
    label_map = MAPS / "cpsc2018_to_ptbxl_superdiagnostic.csv"
    result = cli("experiments.evaluate", f"--workdir={workdir}", f"--data_dir={cpsc}", f"--label_map={label_map}",
                 "--name=cpsc", "--bootstrap_resamples=20")
    assert result.returncode == 0, result.stderr[-3000:]
    assert {name: (workdir / name).read_bytes() for name in before} == before
    external = json.loads((workdir / "eval_external_cpsc.json").read_text())
    assert external["external"]["num_records"] == 10
    assert external["external"]["run_classes_without_source"] == ["HYP", "MI", "STTC"]
    assert set(external["per_class_auc"]) == {"CD", "NORM"}
    assert external["num_external_records"] == 10 and "num_test_records" not in external
    assert external["num_run_val_records"] == 16 and set(external["positives_per_class"]) == {"CD", "NORM"}
    assert [e["class"] for e in external["excluded_classes"]][:3] == ["HYP", "MI", "STTC"]
    assert all(e["reason"] for e in external["excluded_classes"])
    assert set(external["notes"]) == {"run_val_macro_auc_on_scored_classes", "checkpoint_val_macro_auc"}
    scores = dict(np.load(workdir / "scores_external_cpsc.npz"))
    labels = dict(zip(scores["record_ids"], scores["y"].tolist()))
    names = list(scores["label_names"])
    assert labels["A1983"][names.index("NORM")] == 1 and labels["A1986"][names.index("CD")] == 1  # Normal, RBBB
    assert "excluded class HYP: no source label maps onto it" in result.stdout

    unmapped = cli("experiments.evaluate", f"--workdir={workdir}", f"--data_dir={cpsc}", "--name=cpsc")
    assert unmapped.returncode == 1 and "give --label_map=FILE" in unmapped.stderr
    no_name = cli("experiments.evaluate", f"--workdir={workdir}", f"--data_dir={cpsc}", f"--label_map={label_map}")
    assert no_name.returncode == 1 and "needs --name=NAME" in no_name.stderr


def test_label_maps_are_checked(student, tmp_path, caplog):
    workdir, _ = student
    bad = tmp_path / "bad.csv"
    bad.write_text("source_label,target_label\nNormal,NORMAL\nRBBB,CD\n")
    # The row, with its source and target, not only the unknown target (issue 24).
    with pytest.raises(ValueError, match=rf"^{bad}: row 2 Normal -> NORMAL: not a label of the run"):
        evaluate.read_label_map(bad, source_labels=["Normal"], run_labels=["NORM", "CD"])
    bad.write_text("source_label,target_label\nNormal,NORM\nRBB,CD\n")  # a typo of a source label: warned
    with caplog.at_level(logging.WARNING):
        assert evaluate.read_label_map(bad, source_labels=["Normal", "RBBB"], run_labels=["NORM", "CD"]) == {
            "Normal": "NORM"}
    assert f"{bad}: source label(s) ['RBB'] do not occur in the shards" in caplog.text
    with pytest.raises(ValueError, match=rf"^{bad}: none of its source labels \['Normal', 'RBB'\] occurs"):
        evaluate.read_label_map(bad, source_labels=["AF"], run_labels=["NORM", "CD"])
    for shipped in MAPS.glob("*_to_ptbxl_*.csv"):
        rows = shipped.read_text().splitlines()
        assert rows[0] == "source_label,target_label" and len(rows) > 3


def test_reader_errors_name_the_file(tmp_path):
    (tmp_path / "x.csv").write_text("1\n2\nnot a number\n")
    with pytest.raises(ReadError, match=r"x.csv: unreadable .csv trace"):
        read_any(tmp_path / "x.csv", fs=100, leads=["I"])


def test_the_onnx_file_alone_reproduces_predict(student, tmp_path):
    """examples/onnx_predict.py (numpy + onnxruntime, its own resample_poly) on a CPSC .mat
    (500 Hz, as a program) and a 250 Hz trace (imported) gives predict's probabilities within
    1e-5; the metadata names the units, the rules and the run by content, not by a local path."""
    import importlib.util

    from scipy import signal as sps

    workdir, _ = student
    model = tmp_path / "m.onnx"
    export.export_run(workdir, model, fmt="onnx")
    meta = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert meta["units"] == "mV" and "resample_poly" in json.loads(meta["preprocessing_rules"])["resampler"]
    run = json.loads(meta["run"])
    assert run["config_hash"] == run_dir.load_info(workdir)["config_hash"] and run["name"] == workdir.name
    assert str(tmp_path.parent) not in json.dumps(dict(meta)) and "source_run" not in meta

    predictor = inference.Predictor(workdir)  # what experiments.predict scores with
    mat = SAMPLES / "cpsc2018" / "A1980.mat"
    signal, fs, leads = read_any(mat)
    got = tmp_path / "onnx.json"
    result = subprocess.run([sys.executable, str(REPO / "examples" / "onnx_predict.py"), str(model), str(mat),
                             f"--out={got}"], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    have = json.loads(got.read_text())[str(mat)]
    want = predictor.predict(signal, fs=fs, leads=leads)
    np.testing.assert_allclose(list(have["probabilities"].values()), want, atol=1e-5)
    assert list(have["decisions"].values()) == predictor.decisions(want)

    spec = importlib.util.spec_from_file_location("onnx_predict", REPO / "examples" / "onnx_predict.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    trace = sps.resample_poly(signal[:, :1], 1, 2, axis=0).astype(np.float32)  # a 250 Hz wearable's lead I
    np.testing.assert_allclose(example.OnnxPredictor(str(model)).predict(trace, 250.0, ["I"]),
                               predictor.predict(trace, fs=250, leads=["I"]), atol=1e-5)


def test_a_microvolt_trace_is_refused_in_one_line_and_units_convert_it(student, tmp_path):
    workdir, _ = student
    signal, _, _ = read_any(_record_path(1))
    micro = tmp_path / "lead_i_uv.csv"
    np.savetxt(micro, signal[:, 0] * 1000, delimiter=",")
    result = cli("experiments.predict", f"--workdir={workdir}", str(micro), "--fs=100", "--lead=I")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "look like microvolts" in errors[0] and str(micro) in errors[0], result.stderr
    with pytest.raises(inference.RecordError, match="microvolts"):
        inference.predict(workdir, signal[:, :1] * 1000, fs=100, leads=["I"])
    converted = inference.predict(workdir, read_any(micro, fs=100, leads=["I"], units="uV")[0], fs=100, leads=["I"])
    np.testing.assert_allclose(list(converted.values()),
                               list(inference.predict(workdir, signal[:, :1], fs=100, leads=["I"]).values()), atol=1e-5)


def test_degenerate_thresholds_are_flagged_and_an_operating_point_can_be_chosen(student):
    workdir, _ = student
    saved = json.loads((workdir / "thresholds.json").read_text())
    assert set(saved["validation_positives"]) == set(saved["per_class"])
    assert saved["caveats"], "the 16-record sample validation split gives no trustworthy threshold"
    predictor = inference.Predictor(workdir)
    assert predictor.threshold_caveats == saved["caveats"]
    predictor.use_sensitivity(0.9)
    assert "sensitivity >= 0.9" in predictor.operating_point
    val = np.load(workdir / "scores_val.npz")
    for k, name in enumerate(predictor.label_names):
        positives = val["scores"][val["y"][:, k] == 1, k]
        if predictor.thresholds[name] is not None:
            assert np.mean(positives >= predictor.thresholds[name]) >= 0.9


def test_predict_mixes_rates_in_one_call_and_writes_every_window(student, tmp_path):
    """A 500 Hz CPSC .mat, a 250 Hz and a 100 Hz CSV in one call (trace.csv@RATE); the output
    names each input's rate, duration and windows; --per_window adds them."""
    from scipy import signal as sps

    workdir, _ = student
    mat = SAMPLES / "cpsc2018" / "A1980.mat"
    signal, _, _ = read_any(mat)
    fast, slow = tmp_path / "lead_i_250.csv", tmp_path / "lead_i_100.csv"
    np.savetxt(fast, sps.resample_poly(signal[:, 0], 1, 2), delimiter=",")
    np.savetxt(slow, sps.resample_poly(signal[:, 0], 1, 5), delimiter=",")
    out = tmp_path / "p.json"
    result = cli("experiments.predict", f"--workdir={workdir}", str(mat), f"{fast}@250", f"{slow}@100", "--lead=I",
                 "--per_window", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads(out.read_text())["records"]
    assert [r["input"]["sampling_rate_hz"] for r in records] == [500.0, 250.0, 100.0]
    duration = len(signal) / 500
    for r in records:
        assert abs(r["input"]["duration_s"] - duration) < 0.01 and r["input"]["windows"] == len(r["windows"])
        assert r["windows"][0]["start_s"] == 0.0
        top = {n: max(w["probabilities"][n] for w in r["windows"]) for n in r["probabilities"]}
        np.testing.assert_allclose(list(top.values()), list(r["probabilities"].values()), atol=1e-12)  # max
    assert f"(250 Hz, {duration:.1f} s, {records[1]['input']['windows']} window(s) of 2.5 s" in result.stdout


# One of each family (the XResNets share their blocks; fcn_wang is exported by the tests above).
@pytest.mark.parametrize("arch", ["xresnet1d18", "resnet1d_wang", "inception1d"])
def test_every_net_family_exports_to_onnx_equal_to_jax(arch, tmp_path):
    """Every family, not only the tests' small net: the XResNets' ceil-mode average pool once
    exported a (1, 1, 0) divisor that onnxruntime refused to load. Weights and BatchNorm
    statistics are perturbed so that the outputs vary (fresh XResNets output a constant)."""
    model = models_lib.create_model(arch, num_classes=5, width_mult=0.25)
    variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 250, 1), np.float32), train=False)
    rng = np.random.default_rng(1)
    leaves, tree = jax.tree.flatten(variables)
    variables = jax.tree.unflatten(tree, [np.asarray(a) + 0.1 * (np.std(a) + 0.1) * rng.standard_normal(a.shape)
                                          .astype(np.float32) for a in leaves])
    variables["batch_stats"] = jax.tree.map(lambda a: np.abs(a) + 0.5, variables["batch_stats"])

    def fn(x):
        return jax.nn.sigmoid(model.apply(variables, x, train=False)[0])

    export.to_onnx(export.ExportedNet(fn=fn, window=250, leads=["I"], metadata={}), tmp_path / "m.onnx")
    x = rng.normal(size=(7, 250, 1)).astype(np.float32)
    want = np.asarray(jax.jit(fn)(x))
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"ecg": x})[0]
    assert want.std() > 0.01 and np.abs(got - want).max() <= 1e-5


def test_wfdb_headers_in_microvolts_are_read_in_millivolts(tmp_path):
    import wfdb

    signal, fs, _ = read_any(_record_path(1))
    lead = np.round(signal[:, :2] * 1000).astype(np.float64)  # the same two leads in uV
    wfdb.wrsamp("rec_uv", fs=fs, units=["uV", "uV"], sig_name=["I", "II"], p_signal=lead, fmt=["16", "16"],
                adc_gain=[1.0, 1.0], baseline=[0, 0], write_dir=str(tmp_path))
    read, rate, leads = read_any(tmp_path / "rec_uv")
    assert leads == ["I", "II"] and rate == fs
    np.testing.assert_allclose(read, signal[:, :2], atol=1e-3)
